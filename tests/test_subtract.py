"""Residual subtract on float bases: the variants with a frozen part (PiSSA, the AntiPaSTO family)
with W left untouched and the frozen part taken out in the hook.

Identity at init holds by construction (the hook adds only a change, which is 0 at init),
detach gives back bitwise the same weights (W is never written), checkpoints record the mode,
and a crop checkpoint loads as subtract (and back) with the same outputs. Plus the config
checks for `residual` and a spec whose default is subtract.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora_lite as ll
from conftest import (
    NOT_IDENTITY_AT_INIT,
    SPECS,
    calibration,
    lm_loss,
    logits,
    make_model,
    perturb,
    small_cfg,
    token_batch,
)

ROOT = Path(__file__).resolve().parents[1]
FROZEN = [n for n in SPECS if ll.variant_module(n).RESIDUAL != "none"]


def attach_subtract(model, name, **kw):
    cfg = small_cfg(name, residual="subtract", **kw)
    ll.attach(model, cfg, calibration_data=calibration(), progress=False)
    return cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", FROZEN)
def test_identity_at_init_by_construction(name, dtype):
    model = make_model()
    base = logits(model)
    attach_subtract(model, name, dtype=dtype)
    if name in NOT_IDENTITY_AT_INIT:
        assert not torch.allclose(logits(model), base)
    else:  # the added change is 0 whatever the adapter dtype (up to BLAS summation order for PiSSA)
        torch.testing.assert_close(logits(model), base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", FROZEN)
def test_weights_are_never_written_and_detach_is_bitwise_exact(name):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = logits(model)
    attach_subtract(model, name)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # W untouched while attached
    opt = torch.optim.AdamW(ll.trainable_parameters(model), lr=1e-2)
    loss = lm_loss(model, token_batch(seed=3))
    loss.backward()
    opt.step()
    perturb(model)
    ll.detach(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert torch.equal(logits(model), base)


@pytest.mark.parametrize("name", FROZEN)
def test_subtract_checkpoint_round_trip_and_crop_equivalence(name, tmp_path):
    model = make_model()
    attach_subtract(model, name)
    perturb(model)
    expected = logits(model)
    path = ll.save(model, tmp_path / "s.safetensors")
    meta = ll.read_metadata(path)
    assert meta["config"]["residual"] == "subtract"
    fresh = make_model()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    ll.load(fresh, path)
    assert ll.state(fresh).cfg.residual == "subtract"
    torch.testing.assert_close(logits(fresh), expected, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    ll.save(fresh, tmp_path / "s2.safetensors")
    a, b = load_file(tmp_path / "s.safetensors"), load_file(tmp_path / "s2.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same tensors in crop mode give the same outputs: y = W_res x + ... = W x - frozen x + ...
    cropped = make_model()
    ll.load(cropped, path, residual="crop")
    assert ll.state(cropped).cfg.residual == "crop"
    torch.testing.assert_close(logits(cropped), expected, atol=1e-5, rtol=1e-5)
    crop_path = ll.save(cropped, tmp_path / "c.safetensors")
    back = make_model()
    ll.load(back, crop_path, residual="subtract")
    torch.testing.assert_close(logits(back), expected, atol=1e-5, rtol=1e-5)


def test_set_coeff_zero_is_exact_identity_in_subtract_mode():
    model = make_model()
    base = logits(model)
    attach_subtract(model, "antipasto_arrow")
    perturb(model)
    assert not torch.allclose(logits(model), base)
    ll.set_coeff(model, 0.0)
    assert torch.equal(logits(model), base)


def test_residual_values_are_checked():
    assert ll.from_spec("pissa").residual == "crop" and ll.from_spec("lora").residual == "none"
    assert ll.from_spec("pissa", residual="subtract").residual == "subtract"
    assert ll.PiSSAConfig(residual=None) == ll.from_spec("pissa")
    with pytest.raises(ValueError, match=r"residual: 'cropped' is not one of \['none', 'crop', 'subtract'\]"):
        ll.from_spec("pissa", residual="cropped")
    with pytest.raises(ValueError, match=r"residual='crop': lora takes \['none'\] \(it has no frozen part"):
        ll.from_spec("lora", residual="crop")
    with pytest.raises(ValueError, match=r"residual='subtract': dora takes \['none'\]"):
        ll.from_spec("dora", residual="subtract")
    with pytest.raises(ValueError, match=r"residual='none': antipasto takes \['crop', 'subtract'\] \(its adapter"):
        ll.from_spec("antipasto", residual="none")


def test_load_residual_override_is_checked(tmp_path):
    model = make_model()
    ll.attach(model, ll.LoRAConfig(r=2))
    path = ll.save(model, tmp_path / "l.safetensors")
    with pytest.raises(ValueError, match=r"lora takes \['none'\]"):
        ll.load(make_model(), path, residual="subtract")


def test_a_spec_can_default_to_subtract(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_LITE_CACHE", str(tmp_path / "cache"))
    text = (ROOT / "specs" / "antipasto.yaml").read_text()
    text = text.replace("name: antipasto", "name: antipasto_sub").replace("residual: crop", "residual: subtract")
    (tmp_path / "antipasto_sub.yaml").write_text(text)
    cfg = ll.from_spec(tmp_path / "antipasto_sub.yaml", r=4)
    gen = cfg.variant()
    assert gen.RESIDUAL == "subtract" and gen.RESIDUALS == ("crop", "subtract") and cfg.residual == "subtract"
    assert "frozen_weight" in vars(gen)
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = logits(model)
    ll.attach(model, cfg)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(logits(model), base)
    ll.detach(model)
    ll.attach(model, ll.from_spec(tmp_path / "antipasto_sub.yaml", r=4, residual="crop"))  # the other mode
    assert not torch.equal(
        model.model.layers[0].self_attn.q_proj.weight, before["model.layers.0.self_attn.q_proj.weight"]
    )
    torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=1e-5)
