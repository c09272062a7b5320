"""torch.compile: adapted models trace as one graph, and compiled training matches eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_lite as ll
from conftest import SPECS, attach_small, make_model, token_batch


def graph_breaks(name: str) -> int:
    model = make_model(n_layers=1)
    attach_small(model, name)
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(**token_batch(seed=7)).graph_break_count


@pytest.mark.parametrize("name", SPECS)
def test_adapted_model_traces_without_graph_breaks(name):
    """Every shipped spec, DoRA included (its ||W_i||^2 of a float W is reduced on every call)."""
    assert graph_breaks(name) == 0


class OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(x)


def train(model, steps: int = 3) -> dict:
    opt = torch.optim.AdamW(ll.trainable_parameters(model), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(4, 16, generator=g)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in ll.state(model).targets["proj"].module.named_parameters()}


def test_inductor_compiled_training_matches_eager():
    eager, compiled = OneLayer(), OneLayer()
    compiled.load_state_dict(eager.state_dict())
    for m in (eager, compiled):
        torch.manual_seed(1)
        ll.attach(m, ll.from_spec("lora", r=4, target_names=["proj"]))
    want = train(eager)
    got = train(torch.compile(compiled, backend="inductor"))
    assert want.keys() == got.keys() and "lora_A" in got
    for k in want:
        assert (got[k] - want[k]).abs().max() <= 1e-6, k
