"""LoHa's dense update s (w1_a w1_b) * (w2_a w2_b): exact gradients, only the factors kept for backward."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll
from conftest import make_model, perturb, saved_shapes
from lora_lite.runtime import hadamard_product


def factors(o: int = 5, r: int = 3, i: int = 4, dtype=torch.float64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(o, r), (r, i), (o, r), (r, i)]  # w1_a, w1_b, w2_a, w2_b
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def test_hadamard_product_is_the_scaled_elementwise_product_of_the_two_low_rank_products():
    w1_a, w1_b, w2_a, w2_b = factors()
    want = 0.7 * (w1_a @ w1_b) * (w2_a @ w2_b)  # (o, i)
    torch.testing.assert_close(hadamard_product(w1_a, w1_b, w2_a, w2_b, 0.7), want, rtol=1e-12, atol=0)


def test_hadamard_product_gradients_pass_gradcheck_and_gradgradcheck_in_float64():
    ws = tuple(factors())
    assert torch.autograd.gradcheck(lambda *w: hadamard_product(*w, -1.3), ws)
    assert torch.autograd.gradgradcheck(lambda *w: hadamard_product(*w, -1.3), ws)


@pytest.mark.parametrize("frozen", [(0, 1), (2, 3), (1, 3)])
def test_hadamard_product_gives_the_plain_formulas_gradients_with_some_factors_frozen(frozen):
    ws = factors(seed=1)
    for k in frozen:
        ws[k].requires_grad_(False)
    g = torch.randn(5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # (o, i)
    live = [w for w in ws if w.requires_grad]
    got = torch.autograd.grad(hadamard_product(*ws, 2.0), live, g)
    want = torch.autograd.grad(2.0 * (ws[0] @ ws[1]) * (ws[2] @ ws[3]), live, g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_hadamard_product_keeps_only_the_four_factors_for_backward():
    ws = factors(o=6, r=2, i=7)
    assert sorted(saved_shapes(lambda: hadamard_product(*ws, 0.5))) == [(2, 7), (2, 7), (6, 2), (6, 2)]


def test_dense_loha_forward_keeps_one_d_out_by_d_in_tensor_for_backward():
    """r = 4 on the 32 -> 32 and 32 -> 16 projections: r^2 (i + o) >= i o, the dense branch.

    Autograd keeps dW for x dW^T and nothing else of size (o, i): not the two products.
    """
    model = make_model(n_layers=1)
    ll.attach(model, ll.from_spec("loha", r=4), progress=False)
    perturb(model)
    gen = ll.variant_module("loha")
    sizes = set()
    for t in ll.state(model).targets.values():
        o, i = t.module.out_features, t.module.in_features
        sizes.add((o, i))
        x = torch.randn(2, 3, i, requires_grad=True)  # (..., i)
        y = torch.randn(2, 3, o)  # (..., o)
        shapes = saved_shapes(lambda: gen.forward(t.module, x, y, t.cfg).sum().backward())
        assert sum(s in ((o, i), (i, o)) for s in shapes) == 1, (t.name, shapes)
        for k in ("lora_hada_w1_a", "lora_hada_w1_b", "lora_hada_w2_a", "lora_hada_w2_b"):
            assert getattr(t.module, k).grad.abs().sum() > 0, (t.name, k)
    assert sizes == {(32, 32), (16, 32)}
