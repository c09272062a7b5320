"""LoKr's update x (s w1 (x) w2_a w2_b)^T: exact values and gradients, only x and the factors kept for backward."""

from __future__ import annotations

import math

import pytest
import torch

import lora_lite as ll
from conftest import make_model, perturb, saved_shapes
from lora_lite.runtime import kronecker_apply


def inputs(w1_shape=(2, 3), kn=(4, 5), r=2, lead=(2, 3), dtype=torch.float64, seed=0) -> list[torch.Tensor]:
    """x (*lead, m n), w1 (l, m) = w1_shape, w2_a (k, r), w2_b (r, n), (k, n) = kn, all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    m, (k, n) = w1_shape[1], kn
    shapes = [(*lead, m * n), w1_shape, (k, r), (r, n)]
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def plain(x, w1, w2_a, w2_b, s):
    """The update through the dense Kronecker matrix, as PEFT forms it: x (s kron(w1, w2_a w2_b))^T."""
    return x @ (s * torch.kron(w1, w2_a @ w2_b)).T  # (..., l k)


def test_kronecker_apply_equals_x_times_the_scaled_kronecker_matrix_transposed():
    x, w1, w2_a, w2_b = inputs()
    got = kronecker_apply(x, w1, w2_a, w2_b, 0.7)
    assert got.shape == (2, 3, 2 * 4)
    torch.testing.assert_close(got, plain(x, w1, w2_a, w2_b, 0.7), rtol=1e-12, atol=1e-12)


def test_kronecker_apply_gradients_pass_gradcheck_and_gradgradcheck_in_float64():
    ts = tuple(inputs(w1_shape=(2, 2), kn=(3, 3), lead=(2,)))
    assert torch.autograd.gradcheck(lambda *t: kronecker_apply(*t, -1.3), ts)
    assert torch.autograd.gradgradcheck(lambda *t: kronecker_apply(*t, -1.3), ts)


@pytest.mark.parametrize("frozen", [(0,), (1,), (2, 3), (0, 2), (0, 1, 3)])
def test_kronecker_apply_gives_the_plain_formulas_gradients_with_some_inputs_frozen(frozen):
    ts = inputs(seed=1)
    for j in frozen:
        ts[j].requires_grad_(False)
    g = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # (..., o)
    live = [t for t in ts if t.requires_grad]
    got = torch.autograd.grad(kronecker_apply(*ts, 2.0), live, g)
    want = torch.autograd.grad(plain(*ts, 2.0), live, g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_kronecker_apply_keeps_only_x_and_the_three_factors_for_backward():
    ts = inputs(lead=(6, 7))
    got = saved_shapes(lambda: kronecker_apply(*ts, 0.5))
    assert sorted(got) == sorted([(6, 7, 15), (2, 3), (4, 2), (2, 5)])


def test_lokr_forward_keeps_only_x_and_the_factors_for_backward():
    """Per target, what autograd keeps is x and the three factors: no per-token product of them."""
    model = make_model(n_layers=1)
    ll.attach(model, ll.from_spec("lokr", r=2), progress=False)
    perturb(model)
    gen = ll.variant_module("lokr")
    for t in ll.state(model).targets.values():
        o, i = t.module.out_features, t.module.in_features
        x = torch.randn(2, 3, i, requires_grad=True)  # (..., i)
        y = torch.randn(2, 3, o)  # (..., o)
        factors = [getattr(t.module, k) for k in ("lora_lokr_w1", "lora_lokr_w2_a", "lora_lokr_w2_b")]
        got = [math.prod(s) for s in saved_shapes(lambda: gen.forward(t.module, x, y, t.cfg).sum().backward())]
        assert sorted(got) == sorted([x.numel(), *(w.numel() for w in factors)]), (t.name, got)
        for w in factors:
            assert w.grad.abs().sum() > 0, t.name
        assert x.grad.abs().sum() > 0, t.name


def test_kronecker_apply_backward_runs_under_bfloat16_autocast_and_returns_each_inputs_dtype():
    ts = inputs(dtype=torch.float32, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kronecker_apply(*ts, 1.0)
    out.float().sum().backward()
    for t in ts:
        assert t.grad.dtype == torch.float32 and t.grad.abs().sum() > 0
    want = torch.autograd.grad(plain(*ts, 1.0).sum(), ts)
    for t, w in zip(ts, want, strict=True):
        torch.testing.assert_close(t.grad, w, rtol=0.05, atol=0.05)
