"""Using a trained adapter: PEFT-format export and import, merge, ll.disabled and ll.scale.

On a tiny random Llama (fp32, attention biases on): every shipped spec, moved off its init,
exports to a directory that peft.PeftModel.from_pretrained loads onto the original base with the
same logits (max|diff| <= 1e-5 max|y|); adapters made by PEFT load with ll.load_peft and give
PEFT's logits; merge folds every spec into a plain model; disabled and scale(0) give the base.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lora_lite as ll
from conftest import (
    SPECS,
    CpuBlockDiag,
    assert_unchanged,
    calibration,
    llama,
    perturb,
    small_cfg,
    snapshot,
    token_batch,
)
from lora_lite.peft_io import PEFT_KEYS, ROUTES

peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # max|ours - theirs| / max|ours|, fp32
CROP = [n for n in SPECS if ll.variant_module(n).RESIDUAL == "crop"]
QV = ["q_proj", "v_proj"]


def batch() -> dict:
    return {"input_ids": token_batch(seed=7)["input_ids"]}


def out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch()).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def trained(name: str, **kw):
    """(base, adapted copy): spec `name` attached with small ranks and moved off its init."""
    base = llama()
    model = copy.deepcopy(base)
    ll.attach(model, small_cfg(name, **kw), calibration_data=calibration(), progress=False)
    perturb(model, scale=0.3)
    return base, model


def peft_load(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


# ---------------------------------------------------------------- export


ROUTED = [n for n in SPECS if n in ROUTES]


@pytest.mark.parametrize("name", ROUTED)
def test_export_loads_in_peft_with_the_same_logits(name, tmp_path):
    base, model = trained(name)
    want = out(model)
    assert rel(want, out(base)) > 1e-2, "the adapter should change the output"
    ll.export_peft(model, tmp_path)
    got = out(peft_load(base, tmp_path))
    assert rel(got, want) <= TOL, f"{name}: PEFT's logits differ by {rel(got, want):.2e}"
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    targets = sorted(ll.state(model).targets)
    assert sorted(config["target_modules"]) == targets  # exact module names
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    shared = {k for k in keys if not k.startswith("base_model.model.")}  # VeRA's A and B, once
    assert shared == ({"base_model.vera_A", "base_model.vera_B"} if name == "vera" else set())
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys - shared} == {
        f"base_model.model.{t}" for t in targets
    }
    assert ".default." not in " ".join(keys)


# what PEFT says when a config holds a key its class lacks (peft/config.py), or an OFT config older
# than its Cayley-Neumann series: advice to upgrade or retrain, wrong for a lora-lite export
STALE_ADVICE = re.compile(r"Unexpected keyword|higher version|upgrade PEFT|retrain", re.I)


def peft_fields(peft_type: str) -> set:
    from dataclasses import fields

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return {f.name for f in fields(PEFT_TYPE_TO_CONFIG_MAPPING[peft_type])}


@pytest.mark.parametrize("peft_type", sorted(PEFT_KEYS))
def test_every_config_key_export_may_write_is_a_field_of_peft_config_class(peft_type):
    assert PEFT_KEYS[peft_type] <= peft_fields(peft_type), sorted(PEFT_KEYS[peft_type] - peft_fields(peft_type))


@pytest.mark.parametrize("name", ROUTED)
def test_export_writes_only_keys_peft_defines_and_loads_without_upgrade_warnings(name, tmp_path):
    """LoKr's bias, VeRA's and RoAd's exclude_modules made PEFT warn 'Unexpected keyword arguments ...
    upgrade PEFT'; an OFT export without peft_version, 'retrain your adapter weights'."""
    base, model = trained(name)
    ll.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config) <= peft_fields(config["peft_type"]), sorted(set(config) - peft_fields(config["peft_type"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert not [str(w.message) for w in caught if STALE_ADVICE.search(str(w.message))]
    assert rel(out(theirs), out(model)) <= TOL


@pytest.mark.parametrize("r", [2, 4])
def test_lokr_exports_w2_in_the_layout_peft_builds_for_its_r(r, tmp_path):
    """r < max(k, n) / 2: w2_a, w2_b; otherwise PEFT holds a full w2, written as w2_a w2_b."""
    base, model = trained("lokr", r=r)
    ll.export_peft(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        q = {k.rsplit(".", 1)[1]: tuple(f.get_tensor(k).shape) for k in f.keys() if ".0.self_attn.q_proj." in k}
    assert q == (
        {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}
        if r == 2
        else {"lokr_w1": (4, 4), "lokr_w2": (8, 8)}
    )
    assert rel(out(peft_load(base, tmp_path)), out(model)) <= TOL


RSLORA_FA = """name: rslora_fa
title: rsLoRA-FA
summary: rsLoRA's scale with LoRA-FA's frozen A.
references: []
reference_impl: PEFT peft/tuners/lora/layer.py (use_rslora=True)
identity: B = 0.
hyperparameters:
  r: {type: int, default: 8, min: 1, max: 65536, rank: true, doc: rank}
  alpha: {type: float, default: 16.0, min: -1.0e+6, max: 1.0e+6, doc: "s = alpha / sqrt(r)"}
target: {names: ['\\.q_proj$', '\\.v_proj$']}
basis: {source: none}
core: {kind: lowrank}
modifiers: [{kind: scale, rule: alpha_over_sqrt_r}, {kind: frozen, tensors: [lora_A]}]
residual: none
hook: output
params:
  lora_A: {shape: [r, d_in], init: kaiming_uniform, trainable: false, doc: frozen}
  lora_B: {shape: [d_out, r], init: zeros, doc: trained}
train: {lr: 1.0e-4}
quantized_base: true
"""


def test_a_custom_spec_composed_as_a_peft_lora_exports_by_its_parts(tmp_path):
    spec = tmp_path / "rslora_fa.yaml"
    spec.write_text(RSLORA_FA)
    base = llama()
    model = copy.deepcopy(base)
    ll.attach(model, ll.from_spec(str(spec), r=4, alpha=8.0))
    perturb(model, scale=0.3)
    ll.export_peft(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 16)  # alpha / sqrt(4) = 16 / 4
    assert rel(out(peft_load(base, tmp_path / "out")), out(model)) <= TOL


def test_a_users_spec_named_as_a_shipped_one_exports_by_its_own_parts(tmp_path):
    """A user's lora.yaml with rsLoRA's scale is not the shipped lora: its export carries alpha / sqrt(r)."""
    spec = tmp_path / "lora.yaml"
    spec.write_text(RSLORA_FA.replace("name: rslora_fa", "name: lora"))
    base = llama()
    model = copy.deepcopy(base)
    ll.attach(model, ll.from_spec(str(spec), r=4, alpha=8.0))
    perturb(model, scale=0.3)
    ll.export_peft(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["lora_alpha"] == 16
    assert rel(out(peft_load(base, tmp_path / "out")), out(model)) <= TOL


@pytest.mark.parametrize("direction", ["export", "load_peft"])
def test_boft_with_two_butterfly_factors_round_trips_with_peft(direction, tmp_path, monkeypatch):
    """PEFT builds factors >= 2 only with its CUDA extension; its one kernel (block_diag) on the CPU."""
    from peft import BOFTConfig
    from peft.tuners.boft import layer as boft_layer

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(boft_layer, "FastBlockDiag", CpuBlockDiag)
    if direction == "export":
        base, model = trained("boft", boft_n_butterfly_factor=2)
        ll.export_peft(model, tmp_path)
        theirs = peft_load(base, tmp_path)
    else:
        pcfg = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=QV)
        base, theirs, path = peft_made(pcfg, tmp_path)
        model = ll.load_peft(copy.deepcopy(base), path)
    assert theirs.base_model.model.get_submodule("model.layers.0.self_attn.q_proj").boft_R["default"].shape[0] == 2
    assert ll.state(model).cfg.boft_n_butterfly_factor == 2
    assert rel(out(model), out(base)) > 1e-2
    assert rel(out(theirs), out(model)) <= TOL


def test_a_custom_spec_peft_cannot_compute_is_refused_with_its_reason(tmp_path):
    spec = tmp_path / "my_hra_dora.yaml"  # HRA's reflections with DoRA's magnitude: no PEFT type has both
    spec.write_text((ROOT / "specs" / "hra_dora.yaml").read_text().replace("name: hra_dora", "name: my_hra_dora"))
    _, model = trained(str(spec))
    snap = snapshot(model)
    with pytest.raises(ll.AttachError, match=r"my_hra_dora has no PEFT route \(.*core 'householder' is not lowrank"):
        ll.export_peft(model, tmp_path / "out")
    assert_unchanged(model, snap)


@pytest.mark.parametrize("name", [n for n in SPECS if n not in ROUTES])
def test_a_spec_without_a_route_is_refused_pointing_to_merge(name, tmp_path):
    _, model = trained(name)
    snap = snapshot(model)
    with pytest.raises(ll.AttachError, match=r"has no PEFT route \(PEFT's HRA has no DoRA.*use ll.merge\(model\)"):
        ll.export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert_unchanged(model, snap)


def test_pissa_exports_converted_with_doubled_rank_and_alpha(tmp_path):
    base, model = trained("pissa", r=4, alpha=8.0)
    ll.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        A = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    assert A.shape == (8, 32)


@pytest.mark.parametrize("name", ["lora", "eva", "pissa", "antipasto"])
def test_clamped_ranks_export_with_one_scaling_for_every_layer(name, tmp_path):
    """r=20 fits q_proj (32 x 32) but is clamped to 16 on v_proj (16 x 32): rank_pattern and an
    alpha_pattern that keeps lora_alpha / r per layer, so vLLM (r, lora_alpha only) agrees."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, model = trained(name, r=20, **({"alpha": 8.0} if name != "antipasto" else {}))
    ll.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"], "v_proj's clamped rank goes to rank_pattern"
    for key, r_t in config["rank_pattern"].items():
        assert config["alpha_pattern"][key] / r_t == pytest.approx(config["lora_alpha"] / config["r"])
    got = out(peft_load(base, tmp_path))
    assert rel(got, out(model)) <= TOL


@pytest.mark.parametrize("name", ["lora", "pissa", "antipasto_arrow", "ia3", "delora", "vera", "loha", "lokr"])
def test_export_carries_the_current_scale(name, tmp_path):
    base, model = trained(name)
    ll.scale(model, 0.4)
    ll.export_peft(model, tmp_path)
    assert rel(out(peft_load(base, tmp_path)), out(model)) <= TOL


@pytest.mark.parametrize("name", ["dora", "hra", "oft", "boft", "road"])
def test_export_refuses_a_scale_peft_cannot_represent(name, tmp_path):
    _, model = trained(name)
    ll.scale(model, 0.5)
    with pytest.raises(ll.AttachError, match=f"{name} at ll.scale 0.5"):
        ll.export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_refuses_inside_disabled_and_without_an_adapter(tmp_path):
    _, model = trained("lora")
    with ll.disabled(model), pytest.raises(ll.AttachError, match="switched off"):
        ll.export_peft(model, tmp_path / "x")
    with pytest.raises(ll.AttachError, match="no lora-lite adapter"):
        ll.export_peft(llama(), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ---------------------------------------------------------------- load_peft


def peft_made(pcfg, tmp_path, seed: int = 3):
    """(base, PEFT model moved off its init, its saved directory)."""
    base = llama()
    torch.manual_seed(1234)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), pcfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(str(tmp_path))
    return base, theirs, tmp_path


def peft_adapters():
    from peft import (
        BOFTConfig,
        DeloraConfig,
        HRAConfig,
        IA3Config,
        LoHaConfig,
        LoKrConfig,
        LoraConfig,
        OFTConfig,
        RoadConfig,
        VeraConfig,
    )

    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0)
    return {
        "lora": ("lora", LoraConfig(target_modules=QV, **lora)),
        "rslora": ("lora", LoraConfig(target_modules=QV, use_rslora=True, **lora)),
        "dora": ("dora", LoraConfig(target_modules=QV, use_dora=True, **lora)),
        "pissa": ("pissa", LoraConfig(target_modules=QV, init_lora_weights="pissa", **lora)),
        "patterns": (
            "lora",
            LoraConfig(
                target_modules=["q_proj", "v_proj", "down_proj"],
                rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                alpha_pattern={"down_proj": 3},
                layers_to_transform=[1],
                **lora,
            ),
        ),
        "regex": ("lora", LoraConfig(target_modules=r".*\.layers\.0\..*(q|k)_proj", **lora)),
        "ia3": ("ia3", IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[])),
        "ia3_ff": ("ia3_ff", IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"])),
        "hra": ("hra", HRAConfig(r=4, target_modules=QV)),
        "delora": ("delora", DeloraConfig(r=4, delora_lambda=15, target_modules=QV, rank_pattern={"v_proj": 2})),
        "vera": ("vera", VeraConfig(r=4, target_modules=QV, projection_prng_key=7)),
        # LoHa at r 2 (the factored product) and r 4 (the dense update); LoKr at r 2 (w2 = w2_a w2_b)
        # and r 4 (>= max(k, n) / 2 on the tiny q and v: PEFT saves a full w2, read by its SVD)
        "loha": ("loha", LoHaConfig(r=2, alpha=8, target_modules=QV)),
        "loha_dense": ("loha", LoHaConfig(r=4, alpha=8, rank_pattern={"v_proj": 3}, target_modules=QV)),
        "lokr": ("lokr", LoKrConfig(r=2, alpha=8, target_modules=QV)),
        "lokr_full_w2": ("lokr", LoKrConfig(r=4, alpha=6, target_modules=QV)),
        "oft": ("oft", OFTConfig(oft_block_size=4, target_modules=QV)),
        "boft": ("boft", BOFTConfig(boft_block_size=4, target_modules=QV)),
        "road": ("road", RoadConfig(group_size=8, variant="road_4", target_modules=QV)),
    }


@pytest.mark.parametrize("case", sorted(peft_adapters()))
def test_load_peft_gives_peft_logits(case, tmp_path):
    spec, pcfg = peft_adapters()[case]
    base, theirs, path = peft_made(pcfg, tmp_path)
    want = out(theirs)
    assert rel(want, out(base)) > 1e-2
    ours = ll.load_peft(copy.deepcopy(base), path)
    assert ll.state(ours).variant.NAME == spec
    assert sorted(ll.state(ours).targets) == sorted(
        n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "base_layer")
    )
    assert rel(out(ours), want) <= TOL, f"{case}: logits differ from PEFT by {rel(out(ours), want):.2e}"
    ll.save(ours, tmp_path / "ours.safetensors")  # a loaded PEFT adapter is an ordinary lora-lite one
    again = ll.load(copy.deepcopy(base), tmp_path / "ours.safetensors")
    assert torch.equal(out(again), out(ours))


def test_load_peft_then_export_round_trips_through_peft(tmp_path):
    spec, pcfg = peft_adapters()["patterns"]
    base, theirs, path = peft_made(pcfg, tmp_path / "a")
    ours = ll.load_peft(copy.deepcopy(base), path)
    ll.export_peft(ours, tmp_path / "b")
    assert rel(out(peft_load(base, tmp_path / "b")), out(theirs)) <= TOL


REFUSED = {
    "init_lora_weights": "pissa_niter_4",
    "corda_config": {"cache_file": "c.pt"},
    "loftq_config": {"loftq_bits": 4},
    "modules_to_save": ["lm_head"],
    "bias": "all",
    "trainable_token_indices": [1, 2],
    "use_qalora": True,
}


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_load_peft_refuses_an_unsupported_key_naming_it(key, tmp_path):
    from peft import LoraConfig

    base, _, path = peft_made(LoraConfig(r=4, lora_alpha=8, target_modules=QV), tmp_path)
    cpath = path / "adapter_config.json"
    config = json.loads(cpath.read_text())
    config[key] = REFUSED[key]
    cpath.write_text(json.dumps(config))
    snap = snapshot(base)
    with pytest.raises(ll.CheckpointError, match=key) as e:
        ll.load_peft(base, path)
    assert "\n" not in str(e.value)
    assert_unchanged(base, snap)


MISTYPED = [
    ("lora", "r", 4.5),
    ("lora", "r", "4"),
    ("lora", "lora_alpha", "8"),
    ("lora", "use_rslora", "yes"),
    ("lora", "rank_pattern", {"v_proj": 2.5}),
    ("lora", "alpha_pattern", {"v_proj": True}),
    ("lokr", "r", True),
    ("oft", "use_cayley_neumann", "no"),
    ("road", "group_size", "8"),
]


@pytest.mark.parametrize("spec, key, value", MISTYPED, ids=[f"{s}-{k}-{v!r}" for s, k, v in MISTYPED])
def test_load_peft_refuses_a_config_value_of_the_wrong_json_type_naming_the_key(spec, key, value, tmp_path):
    """PEFT would not build these (r 4.5 layers, "yes" as a flag); coercing them (int(4.5), bool("no"),
    True as r 1) loaded an adapter that computes something else."""
    base, _, path = peft_made(peft_adapters()[spec][1], tmp_path)
    cpath = path / "adapter_config.json"
    cpath.write_text(json.dumps({**json.loads(cpath.read_text()), key: value}))
    snap = snapshot(base)
    with pytest.raises(ll.CheckpointError, match=f"adapter_config.json: {key}=") as e:
        ll.load_peft(base, path)
    assert "\n" not in str(e.value)
    assert_unchanged(base, snap)


OUT_OF_RANGE = [
    ("lora", {"r": -1}, r"r=-1: lora\.r=-1 is below its minimum 1"),
    ("lora", {"lora_alpha": 1e7}, r"lora_alpha=10000000\.0: lora\.alpha=10000000\.0 is above its maximum"),
    ("lora", {"rank_pattern": {"v_proj": 0}}, r"rank_pattern\['v_proj'\]=0: lora\.r=0 is below its minimum 1"),
    ("lokr", {"alpha": -1e7}, r"alpha=-10000000\.0: lokr\.alpha=-10000000\.0 is below its minimum"),
    ("delora", {"delora_lambda": 1e7}, r"delora_lambda=10000000\.0: delora\.lambda0=10000000\.0 is above"),
    ("road", {"group_size": 1}, r"group_size=1: road\.group_size=1 is below its minimum 2"),
]


@pytest.mark.parametrize(
    "spec, change, message", OUT_OF_RANGE, ids=[f"{s}-{next(iter(c))}" for s, c, _ in OUT_OF_RANGE]
)
def test_load_peft_refuses_a_value_out_of_range_naming_the_config_file_and_key(spec, change, message, tmp_path):
    """A range error was lora-lite's SpecError 'lora.r=-1 is below its minimum 1', with no file or key."""
    base, _, path = peft_made(peft_adapters()[spec][1], tmp_path)
    cpath = path / "adapter_config.json"
    cpath.write_text(json.dumps({**json.loads(cpath.read_text()), **change}))
    snap = snapshot(base)
    with pytest.raises(ll.CheckpointError) as e:
        ll.load_peft(base, path)
    assert re.fullmatch(re.escape(str(cpath)) + ": " + message + ".*", str(e.value)), str(e.value)
    assert "\n" not in str(e.value)
    assert_unchanged(base, snap)


def test_load_peft_refuses_hyperparameters_that_do_not_fit_a_layer_naming_it(tmp_path):
    """RoAd's group_size 6 does not divide d_out 32: the tensors ((d_out,) vectors) fit, the forward would not."""
    base, _, path = peft_made(peft_adapters()["road"][1], tmp_path)
    cpath = path / "adapter_config.json"
    cpath.write_text(json.dumps({**json.loads(cpath.read_text()), "group_size": 6}))
    snap = snapshot(base)
    with pytest.raises(
        ll.CheckpointError, match=r"road does not fit model\.layers\.0\.self_attn\.q_proj: .*group_size"
    ):
        ll.load_peft(base, path)
    assert_unchanged(base, snap)


def test_load_peft_names_a_peft_type_it_has_no_route_for(tmp_path):
    from peft import FourierFTConfig

    base, _, path = peft_made(FourierFTConfig(n_frequency=16, target_modules=QV), tmp_path)
    snap = snapshot(base)
    with pytest.raises(ll.CheckpointError, match="load_peft: PEFT type FOURIERFT has no import route yet") as e:
        ll.load_peft(base, path)
    assert "\n" not in str(e.value)
    assert_unchanged(base, snap)


def test_load_peft_refuses_pickle_weights(tmp_path):
    from peft import LoraConfig

    base, _, path = peft_made(LoraConfig(r=4, lora_alpha=8, target_modules=QV), tmp_path)
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    snap = snapshot(base)
    with pytest.raises(ll.CheckpointError, match="adapter_model.bin"):
        ll.load_peft(base, path)
    assert_unchanged(base, snap)


def test_load_peft_refuses_a_misshapen_tensor(tmp_path):
    from peft import LoraConfig

    base, _, path = peft_made(LoraConfig(r=4, lora_alpha=8, target_modules=QV), tmp_path)
    cpath = path / "adapter_config.json"
    cpath.write_text(json.dumps({**json.loads(cpath.read_text()), "r": 3}))
    snap = snapshot(base)
    with pytest.raises(ll.CheckpointError, match=r"lora_A.weight has shape \(4, 32\), expected \(3, 32\)"):
        ll.load_peft(base, path)
    assert_unchanged(base, snap)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_load_peft_reads_an_embedding_adapter_saved_with_its_base_weight(use_dora, tmp_path):
    """PEFT's default save_embedding_layers='auto' also writes embed_tokens.base_layer.weight:
    accepted when it is this model's weight."""
    from peft import LoraConfig

    pcfg = LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], use_dora=use_dora)
    base, theirs, path = peft_made(pcfg, tmp_path)
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        assert "base_model.model.model.embed_tokens.base_layer.weight" in f.keys()
    ours = ll.load_peft(copy.deepcopy(base), path)
    assert ll.state(ours).variant.NAME == ("dora" if use_dora else "lora")
    assert "model.embed_tokens" in ll.state(ours).targets
    assert rel(out(ours), out(theirs)) <= TOL


@pytest.mark.parametrize("change", ["values", "shape"])
def test_load_peft_refuses_a_saved_base_weight_that_is_not_this_models(change, tmp_path):
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    base, _, path = peft_made(LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]), tmp_path)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    wpath = path / "adapter_model.safetensors"
    tensors = load_file(str(wpath))
    W = tensors[key]
    tensors[key] = W + 0.01 if change == "values" else torch.cat([W, W[:2]])  # (66, 32): a resized vocabulary
    save_file(tensors, str(wpath))
    snap = snapshot(base)
    why = r"differs from this model's model.embed_tokens.weight" if change == "values" else r"shape \(66, 32\)"
    with pytest.raises(ll.CheckpointError, match=re.escape(key) + ".*" + why) as e:
        ll.load_peft(base, path)
    assert "\n" not in str(e.value)
    assert_unchanged(base, snap)


# ---------------------------------------------------------------- merge


@pytest.mark.parametrize("name", SPECS)
def test_merge_gives_the_same_logits_and_a_plain_model(name):
    _, model = trained(name)
    want = out(model)
    merged = ll.merge(model)
    assert merged is model and ll.state(model) is None
    assert not any(k.split(".")[-1].startswith("lora_") for k in model.state_dict())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters()), "requires_grad as before attach"
    assert rel(out(model), want) <= TOL, f"{name}: merged logits differ by {rel(out(model), want):.2e}"


def test_merge_applies_scale_and_coeff_and_round_trips_save_pretrained(tmp_path):
    import transformers

    _, model = trained("antipasto_arrow")
    ll.set_coeff(model, 0.7)
    ll.scale(model, 0.5)
    want = out(model)
    ll.merge(model).save_pretrained(str(tmp_path))
    again = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert rel(out(again), want) <= TOL


def test_merge_in_bf16_is_no_worse_than_peft_merge_and_unload():
    """Same LoRA tensors on a bf16 base: the merged weights' error against the exact fp32 merge."""
    from peft import LoraConfig

    base = llama().to(torch.bfloat16)
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.from_spec("lora", r=4, alpha=8.0))
    perturb(ours, scale=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=QV))
    exact = {}
    with torch.no_grad():
        for n, t in ll.state(ours).targets.items():
            layer = theirs.base_model.model.get_submodule(n)
            layer.lora_A["default"].weight.copy_(t.module.lora_A)
            layer.lora_B["default"].weight.copy_(t.module.lora_B)
            exact[n] = t.module.weight.double() + 2.0 * (t.module.lora_B.double() @ t.module.lora_A.double())
    ll.merge(ours)
    theirs = theirs.merge_and_unload()
    for n, W in exact.items():
        err_ours = (ours.get_submodule(n).weight.double() - W).abs().max()
        err_peft = (theirs.get_submodule(n).weight.double() - W).abs().max()
        assert err_ours <= err_peft, (n, float(err_ours), float(err_peft))


def test_merge_refuses_inside_disabled_leaving_the_model_adapted():
    _, model = trained("lora")
    want = out(model)
    with ll.disabled(model), pytest.raises(ll.AttachError, match="adapter 'default' is inactive"):
        ll.merge(model)
    assert ll.state(model) is not None and torch.equal(out(model), want)


def test_merge_unties_a_linear_weight_shared_by_two_targets_so_each_keeps_its_adapter():
    """k_proj and v_proj share one weight Parameter: each gets its own merged weight (writing
    both updates into the shared one would give both layers the wrong map)."""
    from lora_lite.tiny import tiny_lm

    model = tiny_lm(seed=0).eval()
    attn = model.model.layers[0].self_attn
    attn.k_proj.weight = attn.v_proj.weight
    ll.attach(model, ll.from_spec("lora", r=4, target_names=["k_proj", "v_proj"]))
    perturb(model, scale=0.3)
    batch = token_batch(seed=7)
    with torch.no_grad():
        want = model(**batch)
        ll.merge(model)
        assert rel(model(**batch), want) <= TOL
    assert attn.k_proj.weight is not attn.v_proj.weight


def test_merge_of_a_target_whose_weight_a_non_target_shares_leaves_the_other_layer_as_it_was():
    from lora_lite.tiny import tiny_lm

    model = tiny_lm(seed=0).eval()
    attn = model.model.layers[0].self_attn
    attn.k_proj.weight = attn.v_proj.weight
    base = attn.v_proj.weight.detach().clone()
    ll.attach(model, ll.from_spec("lora", r=4, target_names=[r"0\.self_attn\.k_proj"]))
    perturb(model, scale=0.3)
    batch = token_batch(seed=7)
    with torch.no_grad():
        want = model(**batch)
        ll.merge(model)
        assert rel(model(**batch), want) <= TOL
    assert torch.equal(attn.v_proj.weight, base) and not torch.equal(attn.k_proj.weight, base)


@pytest.mark.parametrize("name", ["lora", "dora", "oft", "vera"])
def test_merge_refuses_an_adapter_with_nan_tensors_leaving_the_model_unchanged(name):
    """PEFT's merge_and_unload(safe_merge=True) refuses NaN merged weights; merge writes the base
    weights and detaches, so a NaN there could not be undone."""
    _, model = trained(name)
    trainable = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        trainable[0][1].view(-1)[0] = float("nan")
    snap = snapshot(model)
    with pytest.raises(ll.AttachError, match=r"merge: model\.layers\.\d\.\S+: the merged weight would hold NaN") as e:
        ll.merge(model)
    assert "\n" not in str(e.value)
    assert_unchanged(model, snap)


def test_merge_refuses_a_merged_weight_that_overflows_a_float16_base():
    """A finite fp32 merged weight beyond float16's range would be written as inf (PEFT's
    safe_merge checks the weight in its own dtype)."""
    model = llama().half()
    ll.attach(model, ll.from_spec("lora", dtype="float32"))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.fill_(1e4)
        model.model.layers[0].self_attn.q_proj.lora_A.fill_(10.0)
    snap = snapshot(model)
    with pytest.raises(ll.AttachError, match=r"merge: model\.layers\.0\.self_attn\.q_proj: the merged weight would"):
        ll.merge(model)
    assert_unchanged(model, snap)


def test_export_peft_refuses_nan_adapter_tensors_writing_nothing(tmp_path):
    _, model = trained("lora")
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora_B[0, 0] = float("inf")
    snap = snapshot(model)
    with pytest.raises(ll.CheckpointError, match=r"v_proj\.lora_B\.weight' holds NaN/inf values; not exported") as e:
        ll.export_peft(model, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    assert_unchanged(model, snap)


def test_merge_refuses_a_quantized_target_naming_it():
    pytest.importorskip("bitsandbytes")
    from lora_lite.testing import quantize
    from lora_lite.tiny import tiny_lm

    model = quantize(tiny_lm(seed=0, d=64, d_ff=128), "int8", device="cpu").eval()
    ll.attach(model, small_cfg("lora"))
    with pytest.raises(ll.AttachError, match=r"merge: model\.layers\.0\.self_attn\.q_proj is quantized \(int8\)"):
        ll.merge(model)
    assert ll.state(model) is not None


# ---------------------------------------------------------------- disabled and scale


@pytest.mark.parametrize("name", SPECS)
def test_disabled_and_scale_zero_give_the_base_outputs(name):
    base, model = trained(name)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    adapted, want = out(model), out(base)
    with ll.disabled(model):
        off = out(model)
    ll.scale(model, 0.0)
    zero = out(model)
    if name in CROP:  # x W_res^T + the frozen part: the base within rounding
        assert rel(off, want) <= TOL
    else:
        assert torch.equal(off, want), "bit for bit where W is not cropped"
    assert torch.equal(zero, off)
    ll.scale(model, 1.0)
    assert torch.equal(out(model), adapted)
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in sd.items()), "no tensor changed"


def test_disabled_nests_and_restores_after_an_exception():
    base, model = trained("lora")
    adapted = out(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ll.disabled(model):
            with ll.disabled(model):
                pass
            assert torch.equal(out(model), out(base)), "still off after the inner block"
            raise RuntimeError("boom")
    assert torch.equal(out(model), adapted)


@pytest.mark.parametrize("name", SPECS)
def test_scale_interpolates_between_base_and_adapted(name):
    base, model = trained(name)
    y0, y1 = out(base), out(model)
    ll.scale(model, 0.5)
    # per layer y_base + v (y_adapted - y_base); the model's logits are not linear in v, so check one layer
    t = next(iter(ll.state(model).targets.values()))
    x = torch.randn(3, t.module.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        half = t.module(x)
        ll.scale(model, 1.0)
        full = t.module(x)
        ll.scale(model, 0.0)
        zero = t.module(x)
    torch.testing.assert_close(half, zero + 0.5 * (full - zero), rtol=0, atol=1e-5 * float(full.abs().max()))
    assert rel(y1, y0) > 1e-2


@pytest.mark.parametrize("name", ["lora", "eva"])
def test_scale_equals_peft_rescale_adapter_scale(name, tmp_path):
    from peft.helpers import rescale_adapter_scale

    base, model = trained(name)
    ll.export_peft(model, tmp_path)
    theirs = peft_load(base, tmp_path)
    ll.scale(model, 0.3)
    with rescale_adapter_scale(theirs, 0.3):
        want = out(theirs)
    assert rel(out(model), want) <= TOL


def test_scale_is_saved_in_checkpoints(tmp_path):
    base, model = trained("antipasto")
    ll.scale(model, 0.25)
    want = out(model)
    ll.save(model, tmp_path / "a.safetensors")
    fresh = ll.load(copy.deepcopy(base), tmp_path / "a.safetensors")
    assert all(t.scale == 0.25 for t in ll.state(fresh).targets.values())
    assert rel(out(fresh), want) <= TOL


def test_scale_refuses_a_non_finite_value():
    _, model = trained("lora")
    with pytest.raises(ValueError, match="finite"):
        ll.scale(model, float("nan"))
    with pytest.raises(ll.AttachError, match="no lora-lite adapter"):
        ll.scale(llama(), 0.5)


def test_pissa_disabled_gives_the_base_where_peft_gives_w_res(tmp_path):
    """The KNOWN_DIVERGENCES entry: PEFT's disable_adapter() on PiSSA leaves W_res in the layer;
    ours gives the base model. PEFT on the converted export agrees with ours, also when rescaled."""
    from peft import LoraConfig
    from peft.helpers import rescale_adapter_scale

    base, theirs, path = peft_made(
        LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights="pissa"), tmp_path
    )
    ours = ll.load_peft(copy.deepcopy(base), path)
    with theirs.disable_adapter():
        peft_off = out(theirs)
    with ll.disabled(ours):
        ours_off = out(ours)
    assert rel(ours_off, out(base)) <= TOL
    assert rel(peft_off, out(base)) > 1e-2, "PEFT's disabled PiSSA is W_res, not the base"
    ll.export_peft(ours, tmp_path / "converted")
    converted = peft_load(base, tmp_path / "converted")
    ll.scale(ours, 0.3)
    with rescale_adapter_scale(converted, 0.3):
        assert rel(out(converted), out(ours)) <= TOL
    with converted.disable_adapter():
        assert rel(out(converted), out(base)) <= TOL


def test_load_peft_pissa_onto_a_quantized_base_subtracts_leaving_w_untouched(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig

    from lora_lite.testing import quantize

    base, theirs, path = peft_made(
        LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights="pissa"), tmp_path
    )
    q = quantize(copy.deepcopy(base), "int8", device="cpu").eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    ll.load_peft(q, path)
    assert ll.state(q).cfg.residual == "subtract"
    now = q.state_dict()
    assert all(torch.equal(now[k], v) for k, v in before.items()), "the quantized weights are never rewritten"


@pytest.mark.parametrize(
    "version, cayley_neumann, warns",
    [(None, True, True), ("0.17.1", True, True), ("0.18.0.dev0", True, True), ("0.18.0", True, False)]
    + [("0.19.0.dev0@abc", True, False)]
    + [(None, False, False)],
)
def test_load_peft_warns_for_an_oft_adapter_trained_with_the_old_cayley_neumann_series(
    version, cayley_neumann, warns, tmp_path
):
    """PEFT 0.18 changed OFT's Cayley-Neumann series; an adapter saved before (no peft_version, or
    an older one) loads with the new series and a warning naming the file, as PEFT does; exact
    Cayley and newer adapters load silently."""
    base = llama()
    model = copy.deepcopy(base)
    ll.attach(model, ll.from_spec("oft", oft_block_size=8, use_cayley_neumann=cayley_neumann))
    perturb(model, scale=0.1)
    ll.export_peft(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config.pop("peft_version", None)
    path.write_text(json.dumps(config | ({"peft_version": version} if version else {})))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = ll.load_peft(copy.deepcopy(base), tmp_path)
    old = [w for w in caught if "old series" in str(w.message)]
    assert len(old) == int(warns)
    assert all(str(path) in str(w.message) and "\n" not in str(w.message) for w in old)
    batch = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
