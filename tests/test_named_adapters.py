"""Several named adapters on one model: attach/load/save/detach by name, set_active, and their
composition, checked against PEFT's two active adapters on a tiny random Llama (fp32)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lora_lite as ll
from conftest import calibration, llama, perturb, snapshot, token_batch

peft = pytest.importorskip("peft")

TOL = 1e-5


def out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_batch(seed=7)["input_ids"]).logits


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


RANKS = {"lora": (dict(r=4, alpha=8.0), dict(r=2, alpha=3.0)), "dora": (dict(r=4, alpha=8.0), dict(r=2, alpha=3.0))}
RANKS |= {"hra": (dict(r=4), dict(r=2)), "delora": (dict(r=4), dict(r=2)), "ia3": ({}, {})}


def two(spec: str = "lora"):
    """(base, model with `spec` as default on q/v and as 'math' on q/k), both moved off init."""
    base = llama()
    model = copy.deepcopy(base)
    kw, math_kw = RANKS[spec]
    ll.attach(model, ll.from_spec(spec, target_names=[r"\.q_proj$", r"\.v_proj$"], **kw))
    ll.attach(model, ll.from_spec(spec, target_names=[r"\.q_proj$", r"\.k_proj$"], **math_kw), name="math")
    perturb(model, scale=0.3)
    return base, model


@pytest.mark.parametrize("spec", sorted(RANKS))
def test_two_active_adapters_equal_peft_two_active_adapters(spec, tmp_path):
    """LoRA-type updates add, IA3 gains multiply, DoRA takes the running output as its base,
    HRA's reflections compose as PEFT's W H_default H_math (the later adapter wraps the layer)."""
    base, model = two(spec)
    ll.export_peft(model, tmp_path)  # PEFT's layout: default in tmp_path, math in tmp_path/math
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "math" / "adapter_config.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
        theirs.load_adapter(str(tmp_path / "math"), adapter_name="math")
    theirs.base_model.set_adapter(["default", "math"])
    assert rel(out(theirs), out(base)) > 1e-2
    assert rel(out(model), out(theirs)) <= TOL
    theirs.base_model.set_adapter("math")
    ll.set_active(model, "math")
    assert rel(out(model), out(theirs)) <= TOL


def test_the_default_adapter_keeps_its_layout_and_a_named_one_sits_in_a_slot():
    _, model = two()
    keys = model.state_dict().keys()
    assert "model.layers.0.self_attn.q_proj.lora_A" in keys and "model.layers.0.self_attn.v_proj.lora_B" in keys
    assert "model.layers.0.self_attn.q_proj.lora_lite_math.lora_A" in keys
    assert "model.layers.0.self_attn.k_proj.lora_lite_math.lora_B" in keys
    assert sorted(ll.states(model)) == ["default", "math"]
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n), "both adapters train"
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)


def test_save_and_load_by_name_round_trip(tmp_path):
    base, model = two()
    ll.save(model, tmp_path / "d.safetensors", name="default")
    ll.save(model, tmp_path / "m.safetensors", name="math")
    fresh = ll.load(copy.deepcopy(base), tmp_path / "d.safetensors")
    ll.load(fresh, tmp_path / "m.safetensors", name="math")
    assert torch.equal(out(fresh), out(model))
    only_math = ll.load(copy.deepcopy(base), tmp_path / "m.safetensors")  # any checkpoint loads as any name
    ll.set_active(model, "math")
    assert rel(out(only_math), out(model)) <= TOL


def test_detach_by_name_then_all_gives_the_base_back():
    base = llama()
    model = copy.deepcopy(base)
    snap = snapshot(model)
    ll.attach(model, ll.from_spec("pissa", r=4))
    ll.attach(model, ll.from_spec("antipasto", r=4, residual="subtract"), name="gain")
    ll.attach(model, ll.from_spec("hra", r=4), name="rot")
    perturb(model, scale=0.3)
    ll.detach(model, name="gain")
    with pytest.raises(ll.AttachError, match="no adapter named 'gain'"):
        ll.detach(model, name="gain")
    assert sorted(ll.states(model)) == ["default", "rot"]
    ll.detach(model, name="default")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n), "base stays frozen"
    ll.detach(model)
    sd, flags = snap.state_dict, snap.requires_grad
    now = model.state_dict()
    assert now.keys() == sd.keys()
    for k in sd:  # PiSSA restores W within fp32 rounding
        torch.testing.assert_close(now[k], sd[k], rtol=0, atol=1e-6)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not ll.states(model) and all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_second_crop_on_a_cropped_layer_is_refused_naming_it():
    model = llama()
    ll.attach(model, ll.from_spec("pissa", r=4))
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.AttachError, match=r"q_proj is already cropped by adapter 'default'.*residual='subtract'"):
        ll.attach(model, ll.from_spec("antipasto", r=4), name="gain")
    now = model.state_dict()
    assert now.keys() == snap.keys() and all(torch.equal(now[k], v) for k, v in snap.items())
    assert sorted(ll.states(model)) == ["default"]
    assert all(len(m._forward_hooks) <= 1 for m in model.modules())


def test_set_active_and_disabled_nest():
    base, model = two()
    both = out(model)
    ll.set_active(model, [])
    assert torch.equal(out(model), out(base))
    ll.set_active(model, ["default", "math"])
    with ll.disabled(model, name="math"):
        only_default = out(model)
        with ll.disabled(model):
            assert torch.equal(out(model), out(base))
        assert torch.equal(out(model), only_default)
    assert torch.equal(out(model), both)
    with pytest.raises(ll.AttachError, match="no adapter named 'nope'"):
        ll.set_active(model, ["default", "nope"])
    assert torch.equal(out(model), both), "a refused set_active changes nothing"


@pytest.mark.parametrize("spec", ["lora", "hra", "ia3"])
def test_merge_folds_every_active_adapter_and_refuses_an_inactive_one(spec):
    _, model = two(spec)
    ll.set_active(model, "default")
    with pytest.raises(ll.AttachError, match="adapter 'math' is inactive"):
        ll.merge(model)
    ll.set_active(model, ["default", "math"])
    want = out(model)
    ll.merge(model)
    assert not ll.states(model) and rel(out(model), want) <= TOL


def test_calibration_of_a_second_adapter_sees_the_base_model():
    base = llama()
    alone = copy.deepcopy(base)
    ll.attach(alone, ll.from_spec("eva", r=4), calibration_data=calibration(), progress=False)
    model = copy.deepcopy(base)
    ll.attach(model, ll.from_spec("ia3"))
    perturb(model, scale=0.5)  # the default adapter changes every later layer's input
    ll.attach(model, ll.from_spec("eva", r=4), calibration_data=calibration(), progress=False, name="e")
    for n, t in ll.state(alone).targets.items():
        torch.testing.assert_close(ll.state(model, "e").targets[n].holder.lora_A, t.module.lora_A)


def test_set_coeff_reaches_a_named_adapter_only():
    base = llama()
    model = copy.deepcopy(base)
    ll.attach(model, ll.from_spec("antipasto", r=4, residual="subtract"))
    ll.attach(model, ll.from_spec("antipasto", r=4, residual="subtract"), name="gain")
    perturb(model, scale=0.3)
    ll.set_coeff(model, 0.0, name="gain")
    assert ll.state(model, "gain").cfg.coeff == 0.0 and ll.state(model).cfg.coeff == 1.0
    ll.set_active(model, "gain")
    assert rel(out(model), out(base)) <= TOL, "coeff 0 makes the named adapter the identity"
    with pytest.raises(ll.AttachError, match="no adapter named 'nope'"):
        ll.set_coeff(model, 0.5, name="nope")


def test_save_without_name_refuses_several_adapters_listing_them_and_saves_a_lone_named_one(tmp_path):
    _, model = two()
    path = tmp_path / "a.safetensors"
    with pytest.raises(ll.AttachError, match=r"^save: 2 adapters are attached \('default', 'math'\) and a checkpoint"):
        ll.save(model, path)
    assert not path.exists()
    ll.save(model, path, name="math")
    ll.detach(model, name="default")
    ll.save(model, tmp_path / "b.safetensors")  # one adapter left: saved without name=
    fresh = llama()
    ll.load(fresh, tmp_path / "b.safetensors", name="math")
    assert torch.equal(out(fresh), out(model))


def test_attaching_twice_under_one_name_suggests_another_name():
    _, model = two()
    with pytest.raises(
        ll.AttachError, match=r"call ll.detach\(model, name='math'\) first, or attach this one under another name="
    ):
        ll.attach(model, ll.IA3Config(), name="math")
    with pytest.raises(ll.AttachError, match=r"call ll.detach\(model\) first, or attach this one under another name="):
        ll.attach(model, ll.IA3Config())
