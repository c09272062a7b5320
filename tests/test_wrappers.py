"""Public functions take the model or a wrapper of it: torch.compile, DataParallel, DDP, accelerate."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lora_lite as ll
from conftest import attach_small, logits, make_model, perturb
from lora_lite.wrappers import unwrap


@contextlib.contextmanager
def one_process_group(tmp_path):
    """A gloo process group of one rank (file rendezvous, no port), for DDP in this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap(kind: str, model: nn.Module) -> nn.Module:
    if kind == "compile":
        return torch.compile(model, backend="eager")
    if kind == "DataParallel":
        return nn.DataParallel(model)
    if kind == "DDP":
        return nn.parallel.DistributedDataParallel(model)
    if kind == "accelerate":
        from accelerate import Accelerator

        return Accelerator(cpu=True).prepare(model)
    if kind == "compile(DDP)":
        return torch.compile(nn.parallel.DistributedDataParallel(model), backend="eager")
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["compile", "DataParallel", "DDP", "accelerate", "compile(DDP)"])
def test_every_public_function_accepts_a_wrapped_model(kind, tmp_path):
    ctx = one_process_group(tmp_path) if "DDP" in kind else contextlib.nullcontext()
    with ctx:
        model = make_model()
        attach_small(model, "antipasto")
        perturb(model)
        ref = logits(model)
        w = wrap(kind, model)
        assert unwrap(w) is model
        assert ll.state(w) is ll.state(model) is not None
        assert ll.trainable_parameters(w) == ll.trainable_parameters(model)
        ll.set_coeff(w, 0.5)
        assert ll.state(model).cfg.coeff == 0.5
        ll.set_coeff(w, 1.0)
        path = ll.save(w, tmp_path / "a.safetensors")
        assert ll.detach(w) is w and ll.state(model) is None
        late = pytest.warns(UserWarning, match="before wrapping") if "compile" != kind != "accelerate" else None
        with late or contextlib.nullcontext():  # DDP/DataParallel: loading after wrapping warns
            assert ll.load(w, path) is w
        assert torch.equal(logits(model), ref)


def test_attach_into_an_already_ddp_wrapped_model_warns(tmp_path):
    with one_process_group(tmp_path):
        w = nn.parallel.DistributedDataParallel(make_model())
        with pytest.warns(UserWarning, match="before wrapping"):
            ll.attach(w, ll.from_spec("lora", r=4))
        assert ll.state(w.module) is not None


def test_attach_and_detach_after_compiling_take_effect():
    model = make_model(n_layers=1)
    compiled = torch.compile(model, backend="eager")
    base = logits(compiled)
    ll.attach(compiled, ll.from_spec("pissa", r=4))
    perturb(model)
    adapted = logits(compiled)
    assert (adapted - base).abs().max() > 1e-2 and torch.equal(adapted, logits(model))
    ll.detach(compiled)
    assert (logits(compiled) - base).abs().max() < 1e-5
