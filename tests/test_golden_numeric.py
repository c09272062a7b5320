"""Numerical goldens: per spec, logits of a fixed-seed tiny model with the adapter attached
(seeded init, fixed calibration data) and its trainable tensors moved off init by a fixed
perturbation, compared with tests/golden/<spec>.safetensors.

Tolerance: atol = rtol = 1e-4 (fp32 CPU; covers BLAS/LAPACK differences between builds; SVD
signs are made canonical by the generated code). Update after an intended change with
`pytest tests/test_golden_numeric.py --update-golden` (or `just golden`) and review the diff.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_lite as ll
from conftest import SPECS, attach_small, logits, make_model, perturb

GOLDEN = Path(__file__).parent / "golden"


def compute(name: str) -> dict[str, torch.Tensor]:
    model = make_model()
    torch.manual_seed(1234)  # random inits (kaiming A, ...) draw from the global generator, as PEFT does
    attach_small(model, name)
    at_init = logits(model)
    perturb(model)
    return {"logits_at_init": at_init.contiguous(), "logits_trained": logits(model).contiguous()}


@pytest.mark.parametrize("name", SPECS)
def test_numeric_golden(name, update_golden):
    got = compute(name)
    path = GOLDEN / f"{name}.safetensors"
    if update_golden:
        GOLDEN.mkdir(exist_ok=True)
        save_file(got, path)
    assert path.exists(), f"missing golden {path}; create it with: pytest {__file__} --update-golden"
    want = load_file(path)
    assert want.keys() == got.keys()
    for k in want:
        err = (got[k] - want[k]).abs().max().item()
        assert torch.allclose(got[k], want[k], atol=1e-4, rtol=1e-4), (
            f"{name}: {k} moved by up to {err:.2e}; if intended, run: pytest {__file__} --update-golden"
        )


def test_every_golden_names_a_spec():
    assert sorted(p.stem for p in GOLDEN.glob("*.safetensors")) == sorted(SPECS)
    assert len(ROUND_ONE) == 13 and set(ROUND_ONE) <= set(SPECS)


ROUND_ONE = sorted(p.stem for p in (GOLDEN / "checkpoints").glob("*.safetensors"))


@pytest.mark.parametrize("name", ROUND_ONE)
def test_checkpoint_saved_by_round_one_loads_with_the_same_logits(name):
    """tests/golden/checkpoints/<spec>.safetensors were saved (with their spec text as it was
    then) from the model the goldens describe: they must keep loading to the same logits."""
    model = make_model()
    ll.load(model, GOLDEN / "checkpoints" / f"{name}.safetensors")
    want = load_file(GOLDEN / f"{name}.safetensors")["logits_trained"]
    assert torch.allclose(logits(model), want, atol=1e-4, rtol=1e-4)
