"""Runtime API: from_spec overrides, typed configs, targeting, rank clamping, errors that leave
the model unchanged, checkpoint validation, specs compiled on the fly, the upstream Quickstart."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import lora_lite as ll
from conftest import assert_unchanged, calibration, logits, make_model, perturb, snapshot, token_batch

ROOT = Path(__file__).resolve().parents[1]


def test_from_spec_overrides_and_typed_config_are_equivalent():
    a = ll.from_spec("lora", r=4, dtype="bfloat16", target_names=[r"\.q_proj$"], layers=[1])
    b = ll.LoRAConfig(r=4, alpha=16, dtype=torch.bfloat16, target_names=(r"\.q_proj$",), layers=(1,))
    assert a == b
    assert ll.from_spec("lora", r=32).alpha == 16.0  # overriding r leaves alpha at its default, as in PEFT
    assert ll.from_spec(ROOT / "specs" / "lora.yaml") == ll.from_spec("lora")
    assert type(ll.from_spec(str(ROOT / "specs" / "pissa.yaml"))) is ll.PiSSAConfig


def test_every_typed_config_is_its_shipped_spec_config_at_the_spec_defaults():
    for cls_name, spec in ll.CONFIG_NAMES.items():
        assert spec in ll.shipped_names(), cls_name
        assert getattr(ll, cls_name)() == ll.from_spec(spec), cls_name
    assert ll.RoadConfig().group_size == 64 and ll.OFTConfig().oft_block_size == 32  # PEFT's defaults


def test_every_shipped_spec_has_a_typed_config_and_dir_lists_the_lazy_names():
    assert sorted(ll.CONFIG_NAMES.values()) == sorted(ll.shipped_names())
    assert type(ll.from_spec("vera")) is ll.VeRAConfig
    names = dir(ll)
    assert {"LoRAConfig", "VeRAConfig", "AdapterTrainer", "attach", "CONFIG_NAMES"} <= set(names)


def test_unknown_override_and_bad_values():
    with pytest.raises(
        ValueError, match=r"unknown override 'rank'; allowed: r, alpha, dtype, target_names, layers, residual"
    ):
        ll.from_spec("lora", rank=4)
    with pytest.raises(ValueError, match=r"r=0 is below its minimum 1"):
        ll.from_spec("lora", r=0)
    with pytest.raises(ValueError, match="expected int"):
        ll.from_spec("lora", r=2.5)
    with pytest.raises(ValueError, match="unknown dtype 'bf17'"):
        ll.from_spec("lora", dtype="bf17")
    with pytest.raises(ValueError, match="unknown spec 'lorra'.*shipped specs: .*lora"):
        ll.from_spec("lorra")


def test_targets_layers_and_trainable_count():
    model = make_model(n_layers=3)
    ll.attach(model, ll.from_spec("lora", r=2, layers=(0, 2)))
    names = sorted(ll.state(model).targets)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in (0, 2) for p in ("q_proj", "v_proj")]
    # q: 32 -> 32, v: 32 -> 16; r (d_in + d_out) each
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (2 * (32 + 32) + 2 * (32 + 16))


def test_no_matching_target_lists_candidates():
    model = make_model()
    snap = snapshot(model)
    with pytest.raises(ll.AttachError, match=r"no linear layer matches .*linear layers here: model.layers.0"):
        ll.attach(model, ll.from_spec("lora", target_names=("nonexistent",)))
    assert_unchanged(model, snap)


def test_lm_head_and_embeddings_are_excluded():
    model = make_model()
    ll.attach(model, ll.from_spec("lora", target_names=(".",), r=2))
    assert not any("lm_head" in n or "embed" in n for n in ll.state(model).targets)


def test_rank_is_clamped_per_target_with_a_warning_and_recorded(tmp_path):
    model = make_model()
    with pytest.warns(UserWarning, match=r"model.layers.0.self_attn.v_proj: r=24 exceeds min\(d_in, d_out\)=16"):
        ll.attach(model, ll.from_spec("pissa", r=24))
    st = ll.state(model)
    assert st.targets["model.layers.0.self_attn.v_proj"].cfg.r == 16
    assert st.targets["model.layers.0.self_attn.q_proj"].cfg.r == 24
    ll.save(model, tmp_path / "a.safetensors")
    meta = ll.read_metadata(tmp_path / "a.safetensors")
    assert meta["targets"]["model.layers.0.self_attn.v_proj"]["hyperparameters"]["r"] == 16
    assert meta["config"]["r"] == 24
    fresh = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # load reuses the recorded ranks: no new warning
        ll.load(fresh, tmp_path / "a.safetensors")
    torch.testing.assert_close(logits(fresh), logits(model))


def test_attach_twice_detach_nothing_save_nothing(tmp_path):
    model = make_model()
    with pytest.raises(ll.AttachError, match="no lora-lite adapter is attached"):
        ll.detach(model)
    with pytest.raises(ll.AttachError, match="nothing to save"):
        ll.save(model, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    ll.attach(model, ll.LoRAConfig())
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.AttachError, match="already has a lora adapter attached; call ll.detach"):
        ll.attach(model, ll.IA3Config())
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    assert model.state_dict().keys() == snap.keys()


def test_calibration_is_ignored_by_variants_that_need_none():
    model = make_model()
    ll.attach(model, ll.LoRAConfig(), calibration_data=[{"bad": "batch"}])  # never iterated
    assert ll.state(model) is not None


def test_save_is_atomic_and_overwrites_cleanly(tmp_path):
    model = make_model()
    ll.attach(model, ll.LoRAConfig(r=2))
    p = tmp_path / "a.safetensors"
    ll.save(model, p)
    perturb(model)
    ll.save(model, p)
    assert [f.name for f in tmp_path.iterdir()] == ["a.safetensors"]  # no temp files left


def test_load_errors_name_the_layer_and_leave_the_model_unchanged(tmp_path):
    model = make_model()
    ll.attach(model, ll.from_spec("pissa", r=2))
    path = ll.save(model, tmp_path / "p.safetensors")
    other = make_model(n_layers=1)  # lacks layer 1
    snap = snapshot(other)
    with pytest.raises(ll.CheckpointError, match=r"target 'model.layers.1.self_attn.q_proj' is missing"):
        ll.load(other, path)
    assert_unchanged(other, snap)
    wider = make_model(d=48, n_heads=4)
    with pytest.raises(ll.CheckpointError, match=r"model.layers.0.self_attn.q_proj: model layer is .* \(48, 48\)"):
        ll.load(wider, path)
    different = make_model(seed=5)  # same shapes, other weights: PiSSA's math depends on W
    snap = snapshot(different)
    with pytest.raises(ll.CheckpointError, match=r"q_proj: base weight differs .*refusing"):
        ll.load(different, path)
    assert_unchanged(different, snap)


def test_load_onto_other_weights_warns_for_additive_variants(tmp_path):
    model = make_model()
    ll.attach(model, ll.LoRAConfig(r=2))
    path = ll.save(model, tmp_path / "l.safetensors")
    with pytest.warns(UserWarning, match="base weight differs"):
        ll.load(make_model(seed=5), path)


def test_load_rejects_foreign_and_corrupt_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ll.CheckpointError, match="no lora_lite metadata"):
        ll.load(make_model(), tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ll.CheckpointError, match="not a safetensors file"):
        ll.load(make_model(), tmp_path / "junk.safetensors")


def test_load_same_model_in_bf16_passes_fingerprint(tmp_path):
    model = make_model()
    ll.attach(model, ll.from_spec("pissa", r=2))
    path = ll.save(model, tmp_path / "p.safetensors")
    half = make_model().to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ll.load(half, path)
    ll.detach(half)
    ref = make_model().to(torch.bfloat16).state_dict()
    for k, v in half.state_dict().items():  # restored within bf16 rounding of W's largest entries
        assert (v.float() - ref[k].float()).abs().max() <= 2**-7 * ref[k].float().abs().max(), k


def test_checkpoint_metadata_is_self_describing(tmp_path):
    model = make_model()
    ll.attach(model, ll.from_spec("pissa", r=2))
    meta = ll.read_metadata(ll.save(model, tmp_path / "p.safetensors"))
    assert meta["format_version"] == 2 and meta["spec_name"] == "pissa" and len(meta["sha256"]) == 64
    assert "name: pissa" in meta["spec"]
    assert meta["config"] == {
        "target_names": None,
        "layers": None,
        "dtype": "float32",
        "residual": "crop",
        "r": 2,
        "alpha": 16.0,
        "svd_niter": 0,
    }
    t = meta["targets"]["model.layers.0.self_attn.v_proj"]
    assert t["weight_shape"] == [16, 32] and t["weight_dtype"] == "float32" and len(t["fingerprint"]) == 9
    json.dumps(meta)


def test_custom_spec_compiles_on_the_fly_and_reloads_from_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_LITE_CACHE", str(tmp_path / "cache"))
    text = (ROOT / "specs" / "lora.yaml").read_text().replace("name: lora", "name: my_lora")
    text = text.replace("default: 8, min: 1", "default: 3, min: 1").replace(r"'\.v_proj$'", r"'\.o_proj$'")
    (tmp_path / "my_lora.yaml").write_text(text)
    cfg = ll.from_spec(tmp_path / "my_lora.yaml")
    assert cfg.r == 3 and type(cfg).__module__.startswith("lora_lite_user_my_lora_")
    assert list((tmp_path / "cache" / "generated").glob("lora_lite_user_my_lora_*.py"))
    model = make_model()
    ll.attach(model, cfg)
    assert "model.layers.0.self_attn.o_proj" in ll.state(model).targets
    perturb(model)
    path = ll.save(model, tmp_path / "m.safetensors")
    fresh = make_model()
    ll.load(fresh, path)  # the spec text travels in the checkpoint
    torch.testing.assert_close(logits(fresh), logits(model))


def test_calibration_data_errors_leave_model_unchanged():
    # Uses the runtime's statistics collector directly; data-driven specs call it during attach.
    from lora_lite.calibration import collect_input_stats

    model = make_model()
    targets = {"model.layers.0.self_attn.q_proj": model.model.layers[0].self_attn.q_proj}
    snap = snapshot(model)
    with pytest.raises(ValueError, match="calibration_data is empty"):
        collect_input_stats(model, targets, [], progress=False)
    with pytest.raises(ValueError, match="expected a dict"):
        collect_input_stats(model, targets, ["text"], progress=False)
    bad = token_batch()
    with torch.no_grad():
        model.model.embed_tokens.weight[bad["input_ids"][0, 0]] = float("nan")
    with pytest.raises(ValueError, match="non-finite activations at the input of model.layers.0.self_attn.q_proj"):
        collect_input_stats(model, targets, [bad], progress=False)
    model.model.embed_tokens.weight.data.copy_(snap[0]["model.embed_tokens.weight"])
    assert_unchanged(model, snap)
    # padding is excluded: 3 padded positions in row 0 of each batch
    stats = collect_input_stats(model, targets, calibration(n=2), progress=False)
    assert stats["model.layers.0.self_attn.q_proj"]["tokens"] == 2 * (4 * 16 - 3)
    # tuples go to model(*batch); a 0/1 second item shaped like the first is the padding mask
    tuples = [(b["input_ids"], b["attention_mask"]) for b in calibration(n=2)]
    stats_t = collect_input_stats(model, targets, tuples, progress=False)
    assert stats_t["model.layers.0.self_attn.q_proj"]["tokens"] == 2 * (4 * 16 - 3)
    torch.testing.assert_close(
        stats_t["model.layers.0.self_attn.q_proj"]["second_moment"],
        stats["model.layers.0.self_attn.q_proj"]["second_moment"],
    )
    short = dict(token_batch(), attention_mask=torch.ones(4, 5, dtype=torch.long))
    with pytest.raises(ll.AttachError, match=r"batch 0: attention_mask has shape \(4, 5\), input_ids \(4, 12\)"):
        collect_input_stats(model, targets, [short], progress=False)


def test_sequence_second_moment_scales_each_padded_row_by_its_max_as_peft_corda():
    """PEFT's CorDA statistic: mean over sequences of X_s^T X_s / max(X_s)^2, each row's padding left out."""
    from lora_lite.calibration import collect_input_stats

    model = make_model()
    name = "model.layers.0.self_attn.q_proj"
    layer = model.model.layers[0].self_attn.q_proj
    batches = calibration(n=2)  # row 0 of each batch has 3 padded positions
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().float()))
    stats = collect_input_stats(model, {name: layer}, batches, progress=False, statistics=("sequence_second_moment",))
    handle.remove()
    want, n = 0.0, 0
    for x, b in zip(seen, batches):  # x: (B, T, i)
        for row, keep in zip(x, b["attention_mask"].bool()):
            xs = row[keep] / row[keep].max().abs()  # (T_s, i)
            want, n = want + xs.T @ xs, n + 1
    torch.testing.assert_close(stats[name]["sequence_second_moment"], want / n)
    assert stats[name]["sequences"] == n == 8 and "second_moment" not in stats[name]
    with pytest.raises(ll.AttachError, match="unknown statistic 'third_moment'"):
        collect_input_stats(model, {name: layer}, batches, progress=False, statistics=("third_moment",))


def test_readme_quickstart_runs_verbatim(tmp_path, monkeypatch):
    import re

    section = (ROOT / "README.md").read_text().split("## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]  # the README's text, unmodified
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "__main__"}
    exec(compile(code, "README.md", "exec"), scope)
    model = scope["model"]
    assert ll.read_metadata(tmp_path / "adapter.safetensors")["spec_name"] == "lora"
    assert ll.state(model) is not None and all(t.abs().sum() > 0 for t in ll.trainable_parameters(model))


@pytest.mark.parametrize("name", ["lora", "pissa", "ia3_ff", "antipasto_arrow"])
def test_adapted_model_deepcopies_and_pickles(name, tmp_path):
    import copy
    import pickle

    from conftest import attach_small

    model = make_model()
    attach_small(model, name)
    perturb(model)
    want = logits(model)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(logits(clone), want)
    assert (
        ll.state(clone).targets[next(iter(ll.state(clone).targets))].module
        is not next(iter(ll.state(model).targets.values())).module
    )
    ll.detach(clone)  # the copy detaches on its own; the original keeps its adapter
    torch.testing.assert_close(logits(clone), logits(make_model()), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model), want)
    again = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(logits(again), want)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    torch.testing.assert_close(logits(loaded), want)


def test_attach_refuses_a_target_adapted_through_a_submodule():
    model = make_model()
    ll.attach(model.model.layers[0], ll.LoRAConfig(r=2))
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.AttachError, match=r"model.layers.0.self_attn.q_proj already has a lora-lite adapter"):
        ll.attach(model, ll.from_spec("pissa", r=2))
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    assert ll.state(model) is None


def test_clear_errors_for_bad_regex_lm_head_nan_weight_and_bad_coeff(tmp_path):
    model = make_model()
    with pytest.raises(ll.AttachError, match=r"target_names: bad regex '\(q'"):
        ll.attach(model, ll.from_spec("lora", target_names=("(q",)))
    with pytest.raises(
        ll.AttachError,
        match="lm_head matches, but lm_head is never a target, and an embedding only when a pattern spells its name",
    ):
        ll.attach(model, ll.from_spec("lora", target_names=("lm_head",)))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises((ll.AttachError, ValueError), match=r"model.layers.0.self_attn.q_proj"):
        ll.attach(model, ll.from_spec("pissa", r=2))
    assert ll.state(model) is None
    ok = make_model()
    ll.attach(ok, ll.from_spec("antipasto", r=2))
    for bad in (True, float("nan"), "1"):
        with pytest.raises(ValueError, match="coeff must be a finite number"):
            ll.set_coeff(ok, bad)
