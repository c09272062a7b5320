"""Checkpoint compatibility and save guarantees: format-1 files (lora-lite 0.1.0) still load
with the logits they were saved with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lora_lite as ll
from conftest import logits, make_model

V1 = Path(__file__).parent / "fixtures" / "checkpoint_v1"


@pytest.mark.parametrize("name", ["lora", "pissa"])
def test_format_1_checkpoint_loads_with_the_logits_it_was_saved_with(name):
    path = V1 / f"{name}.safetensors"
    assert ll.read_metadata(path)["format_version"] == 1
    model = make_model()
    ll.load(model, path)
    with safe_open(str(path), framework="pt") as f:  # the adapter tensors arrive bit for bit
        for key in f.keys():
            target, tensor = key.rsplit(".", 1)
            assert torch.equal(getattr(model.get_submodule(target), tensor), f.get_tensor(key)), key
    want = load_file(V1 / "expected_logits.safetensors")[name]
    assert torch.equal(logits(model), want)
