"""Layer kinds: transformers Conv1D (GPT-2) for every variant; other kinds refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_lite as ll
from conftest import (
    NOT_IDENTITY_AT_INIT,
    SPECS,
    assert_unchanged,
    calibration,
    hf_gpt2,
    perturb,
    small_cfg,
    snapshot,
    token_batch,
)
from lora_lite.runtime import WEIGHT_READERS

transformers = pytest.importorskip("transformers")
GPT2_TARGETS = (r"\.c_attn$", r"mlp\.c_proj$")  # 32 -> 96 and 128 -> 32, both Conv1D


def gpt2_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**token_batch(seed=7)).logits


def attach_gpt2(model, name: str):
    ll.attach(model, small_cfg(name, target_names=GPT2_TARGETS), calibration_data=calibration(), progress=False)


@pytest.mark.parametrize("name", SPECS)
def test_gpt2_conv1d_attach_train_save_load_detach(name, tmp_path):
    model = hf_gpt2()
    base = gpt2_logits(model)
    wte = model.transformer.wte.weight.detach().clone()
    attach_gpt2(model, name)
    assert len(ll.state(model).targets) == 4
    if name not in NOT_IDENTITY_AT_INIT:
        assert (gpt2_logits(model) - base).abs().max() < 1e-5
    perturb(model)
    model(**token_batch(seed=3), labels=token_batch(seed=3)["input_ids"]).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ll.trainable_parameters(model))
    adapted = gpt2_logits(model)
    assert (adapted - base).abs().max() > 1e-4
    ll.save(model, tmp_path / "a.safetensors")
    fresh = hf_gpt2()
    ll.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(gpt2_logits(fresh), adapted)
    ll.detach(model)
    assert (gpt2_logits(model) - base).abs().max() < 1e-5
    assert torch.equal(model.transformer.wte.weight, wte)  # the tied embedding / lm_head is never touched


def test_gpt2_lora_matches_peft_fan_in_fan_out():
    peft = pytest.importorskip("peft")
    ours, theirs = hf_gpt2(), hf_gpt2()
    ll.attach(ours, ll.from_spec("lora", r=4, alpha=8, target_names=[r"\.c_attn$"]))
    perturb(ours)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    theirs = peft.get_peft_model(theirs, cfg)
    for name, t in ll.state(ours).targets.items():
        layer = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(t.module.lora_A)
            layer.lora_B["default"].weight.copy_(t.module.lora_B)
    assert (gpt2_logits(ours) - gpt2_logits(theirs)).abs().max() < 1e-5


class WithMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(self.attn(x, x, x)[0])


def test_a_layer_whose_parent_reads_its_weight_is_refused_by_name():
    assert nn.MultiheadAttention in WEIGHT_READERS
    model = WithMHA()
    snap = snapshot(model)
    with pytest.raises(ll.AttachError, match=r"attn\.out_proj \(NonDynamicallyQuantizableLinear\) is inside a "):
        ll.attach(model, ll.from_spec("pissa", r=2, target_names=["out_proj"]))
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "layer, kind",
    [(nn.Conv2d(4, 4, 3), "Conv2d"), (nn.Conv1d(4, 4, 3), "Conv1d"), (nn.Bilinear(4, 4, 4), "Bilinear")],
)
def test_another_layer_kind_is_refused_naming_layer_and_type(layer, kind):
    model = nn.Sequential()
    model.add_module("block", nn.Module())
    model.block.add_module("odd", layer)
    model.block.add_module("proj", nn.Linear(4, 4))
    snap = snapshot(model)
    with pytest.raises(ll.AttachError, match=rf"lora: block\.odd is a {kind}; lora-lite adapts linear layers"):
        ll.attach(model, ll.from_spec("lora", r=2, target_names=["block"]))
    assert_unchanged(model, snap)


def test_crop_on_a_tied_weight_is_refused_and_subtract_works():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model[2].weight = model[0].weight  # tied
    snap = snapshot(model)
    with pytest.raises(
        ll.AttachError, match=r"0\.weight shares its storage with 2\.weight, so residual crop would rewrite both"
    ):
        ll.attach(model, ll.from_spec("pissa", r=2, target_names=["^0$"]))
    assert_unchanged(model, snap)
    ll.attach(model, ll.from_spec("pissa", r=2, target_names=["^0$"], residual="subtract"))
    assert torch.equal(model[2].weight, snap[0]["0.weight"])
