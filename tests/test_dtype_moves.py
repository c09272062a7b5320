"""Casting or moving an adapted model after attach: the hooks follow the adapter tensors."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll
from conftest import SPECS, attach_small, lm_loss, logits, make_model, perturb, token_batch

CASTS = {
    "to(bfloat16)": (lambda m: m.to(torch.bfloat16), torch.bfloat16, 0.05),
    "half()": (lambda m: m.half(), torch.float16, 0.01),
    "bfloat16()": (lambda m: m.bfloat16(), torch.bfloat16, 0.05),
    "to(float64)": (lambda m: m.to(torch.float64), torch.float64, 1e-5),
}


@pytest.mark.parametrize("cast", list(CASTS))
@pytest.mark.parametrize("name", SPECS)
def test_cast_after_attach_keeps_outputs_and_gradients(name, cast):
    fn, dtype, tol = CASTS[cast]
    model = make_model()
    attach_small(model, name)
    perturb(model)
    ref = logits(model)
    fn(model)
    st = ll.state(model)
    assert all(getattr(t.module, k).dtype == dtype for t in st.targets.values() for k in t.tensors)
    out = logits(model)
    assert out.isfinite().all()
    assert (out - ref).abs().max() <= tol * ref.abs().max(), name
    lm_loss(model, token_batch(seed=3)).backward()
    grads = [p.grad for p in ll.trainable_parameters(model)]
    assert all(g is not None and g.dtype == dtype and g.isfinite().all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", SPECS)
def test_cast_round_trip_then_detach_gives_the_base_back(name):
    model = make_model()
    base = logits(model)
    attach_small(model, name)
    perturb(model)
    model.to(torch.float64).to(torch.float32)  # fp32 -> fp64 -> fp32 is exact
    ll.detach(model)
    assert (logits(model) - base).abs().max() < 1e-5
