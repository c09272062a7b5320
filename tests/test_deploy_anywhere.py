"""The deploy and named-adapter functions on what training hands back: wrapped models, models
moved to another dtype after attach, GPT-2 Conv1D layers, cropped adapters under a name."""

from __future__ import annotations

import json

import pytest
import torch

import lora_lite as ll
from conftest import assert_unchanged, hf_gpt2, logits, make_model, perturb, small_cfg, snapshot


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_every_deploy_and_named_function_takes_a_compiled_model(tmp_path):
    model = make_model()
    compiled = torch.compile(model, backend="eager")
    assert ll.attach(compiled, small_cfg("lora"), name="math") is compiled
    perturb(model)
    ref = logits(model)
    assert list(ll.states(compiled)) == ["math"]
    ll.set_active(compiled, [])
    assert torch.equal(logits(model), logits(make_model()))
    ll.set_active(compiled, "math")
    ll.scale(compiled, 0.0)
    assert torch.equal(logits(model), logits(make_model()))
    ll.scale(compiled, 1.0)
    with ll.disabled(compiled, "math"):
        assert torch.equal(logits(model), logits(make_model()))
    ll.export_peft(compiled, tmp_path / "peft")
    other = make_model()
    assert ll.load_peft(torch.compile(other, backend="eager"), tmp_path / "peft", name="math") is not None
    assert rel(logits(other), ref) < 1e-5
    ll.merge(compiled)
    assert ll.states(model) == {} and rel(logits(model), ref) < 1e-5


@pytest.mark.parametrize("spec", ["lora", "dora", "ia3"])
def test_an_adapter_moved_to_bf16_saves_as_bf16_and_reloads_to_identical_logits(spec, tmp_path):
    model = make_model()
    ll.attach(model, small_cfg(spec))
    perturb(model)
    model.to(torch.bfloat16)
    ref = logits(model)
    path = ll.save(model, tmp_path / "a.safetensors")
    assert ll.checkpoint.read_metadata(path)["config"]["dtype"] == "bfloat16"
    fresh = make_model().to(torch.bfloat16)
    ll.load(fresh, path)
    assert ll.state(fresh).cfg.dtype == torch.bfloat16
    assert torch.equal(logits(fresh), ref)


def test_a_cropped_adapter_moved_to_bf16_reloads_within_bf16_rounding(tmp_path):
    """W_res was rounded to bf16 at the move; a reload crops the bf16 base: the same up to that rounding."""
    model = make_model()
    ll.attach(model, small_cfg("pissa"))
    perturb(model)
    model.to(torch.bfloat16)
    ref = logits(model)
    fresh = make_model().to(torch.bfloat16)
    ll.load(fresh, ll.save(model, tmp_path / "a.safetensors"))
    assert rel(logits(fresh), ref) < 2e-2


def test_save_refuses_an_adapter_held_in_two_dtypes(tmp_path):
    model = make_model()
    ll.attach(model, small_cfg("lora"))
    t = next(iter(ll.state(model).targets.values()))
    t.module.lora_B.data = t.module.lora_B.data.to(torch.bfloat16)
    with pytest.raises(ll.CheckpointError, match="is bfloat16, but .* is float32; an adapter is saved in one dtype"):
        ll.save(model, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


@pytest.mark.parametrize("spec", ["lora", "pissa", "dora"])
def test_merge_of_a_model_moved_to_bf16_keeps_its_outputs(spec):
    model = make_model()
    ll.attach(model, small_cfg(spec))
    perturb(model)
    model.to(torch.bfloat16)
    ref = logits(model)
    ll.merge(model)
    assert ll.states(model) == {} and model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert rel(logits(model), ref) < 2e-2  # bf16 rounding of the merged W


def test_a_named_cropped_adapter_presents_the_base_weight_in_state_dict():
    model = make_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ll.attach(model, small_cfg("lora"))
    ll.attach(model, small_cfg("pissa"), name="math")
    perturb(model)
    ref = logits(model)
    sd = model.state_dict()
    for k, v in base.items():
        assert torch.allclose(sd[k], v, atol=1e-6), k
    model.load_state_dict(sd)
    assert torch.equal(logits(model), ref)
    ll.detach(model, "math")
    assert all(not m._state_dict_hooks and not m._load_state_dict_pre_hooks for m in model.modules())


def test_a_stray_state_dict_hook_is_refused_and_changes_nothing():
    """A cropped target's state_dict hook left on a layer no adapter accounts for (half-detached copy)."""
    from lora_lite.runtime import SaveFullWeight

    model = make_model()
    donor = make_model()
    ll.attach(donor, small_cfg("pissa"))
    q = model.model.layers[0].self_attn.q_proj
    q.register_state_dict_post_hook(SaveFullWeight(next(iter(ll.state(donor).targets.values()))))
    snap = snapshot(model)
    with pytest.raises(ll.AttachError, match="model.layers.0.self_attn.q_proj has a lora-lite hook"):
        ll.attach(model, small_cfg("lora"))
    assert_unchanged(model, snap)


def gpt2_logits(model, ids=None):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)) if ids is None else ids
    with torch.no_grad():
        return model(ids).logits


def test_conv1d_lora_exports_with_fan_in_fan_out_and_loads_in_peft_and_back(tmp_path):
    import peft

    model = hf_gpt2()
    ll.attach(model, ll.from_spec("lora", r=4, target_names=["c_attn", "c_fc"]))
    perturb(model)
    ref = gpt2_logits(model)
    ll.export_peft(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert rel(gpt2_logits(peft.PeftModel.from_pretrained(hf_gpt2(), tmp_path / "peft")), ref) < 1e-5
    back = hf_gpt2()
    ll.load_peft(back, tmp_path / "peft")
    assert rel(gpt2_logits(back), ref) < 1e-5


def test_conv1d_export_is_refused_where_peft_has_no_conv1d_form(tmp_path):
    model = hf_gpt2()
    ll.attach(model, ll.from_spec("hra", r=4, target_names=["c_attn"]))
    with pytest.raises(ll.AttachError, match="c_attn is a transformers Conv1D, which PEFT's HRA does not adapt"):
        ll.export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_fan_in_fan_out_on_a_linear_target_is_refused(tmp_path):
    model = make_model()
    ll.attach(model, small_cfg("lora"))
    ll.export_peft(model, tmp_path / "peft")
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"fan_in_fan_out": True}))
    fresh = make_model()
    snap = snapshot(fresh)
    with pytest.raises(ll.CheckpointError, match="fan_in_fan_out=True is not supported: target .* is a Linear"):
        ll.load_peft(fresh, tmp_path / "peft")
    assert_unchanged(fresh, snap)


@pytest.mark.parametrize("spec", ["pissa", "dora"])
def test_conv1d_named_adapters_merge_to_the_adapted_outputs(spec):
    model = hf_gpt2()
    ll.attach(model, ll.from_spec("lora", r=4, target_names=["c_attn"]))
    ll.attach(model, ll.from_spec(spec, r=4, target_names=["c_attn", "c_fc"]), name="math")
    perturb(model)
    ref = gpt2_logits(model)
    model.load_state_dict(model.state_dict())
    assert rel(gpt2_logits(model), ref) < 1e-6
    ll.merge(model)
    assert ll.states(model) == {}
    assert rel(gpt2_logits(model), ref) < 1e-5
