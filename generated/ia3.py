# Code generated from specs/ia3.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""IA3: a learned gain vector on the output of the key and value projections.

Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning, arXiv 2205.05638.
Reference implementation: PEFT peft/tuners/ia3/layer.py, class Linear (is_feedforward=False).

Formula (from the composition):

    y = l * (W x + b),    l in R^{d_out}

Identity at init: l = 1.

The gain is cast to the layer's dtype and multiplies y there (the hook casts no activation):
with fp32 adapters on a bf16 model, l and its AdamW state stay fp32, but l is rounded to
bf16 where it multiplies and its gradient is summed in bf16. PEFT multiplies in fp32 instead
and rounds the product; identical in fp32.

Spec: basis=none, core=vector, modifiers=[], residual=none, hook=output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

NAME = "ia3"  # the spec's name
TITLE = "IA3"  # its title
HOOK = "output"  # forward hook: forward() returns the layer's new output
CAST_INPUT = False  # forward() works in the layer's dtype: the hook casts nothing
RESIDUAL = "none"  # the base weight is never modified
RESIDUALS = ("none",)  # the values cfg.residual may take
CALIBRATION = "none"  # calibration data is accepted and ignored
STATISTICS = ()  # what init() reads from stats: calibration gathers these
TARGET_NAMES = ("\\.k_proj$", "\\.v_proj$")  # default targets: re.search on module names
LR = 0.003  # recommended AdamW learning rate
QUANTIZED_BASE = True  # bitsandbytes 4/8-bit targets work (with residual subtract where W is cropped)
USES_BASE_WEIGHT = False  # the math never reads W after init
PER_RANK = {}  # read over r ** e: clamping r to r_c scales it by (r_c / r) ** e
EMBEDDING = False  # attach refuses nn.Embedding targets
SHARED = ()  # tensors kept once per adapter for every target (frozen; see shared())
RUNTIME_KNOBS = ()  # hyperparameters that may change after attach
RANKS = ()  # hyperparameters clamped per target to min(d_in, d_out)
BOUNDS = {}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """IA3 hyperparameters (defaults from specs/ia3.yaml)."""


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_ia3": (("d_out",), "ones", True),  # output gain (PEFT ia3_l)
}


def shapes(cfg: Config, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor for a target whose weight is (d_out, d_in)."""
    return {
        "lora_ia3": (d_out,),
    }


def check(cfg: Config, d_in: int, d_out: int) -> None:
    """Raise ValueError (one line) when a layer whose weight is (d_out, d_in) cannot take `cfg`.

    init() calls it at attach; load calls it before reading a target's tensors, so a checkpoint
    whose shapes fit but whose hyperparameters do not fit the layer is refused, not run.
    """
    return None  # every layer takes it


# i: d_in, o: d_out, r: rank, ...: leading (batch, token) dims
def init(W: Tensor, cfg: Config, stats: dict | None = None) -> dict[str, Tensor]:
    """Initial adapter tensors (fp32) for one target. W: (o, i) base weight, fp32, dequantized.

    `stats` holds statistics of this layer's input, gathered on the intact model, when
    calibration data was given: "second_moment" (i, i) = mean of x x^T and "mean" (i,) = mean
    of x over the counted tokens (padding and labels == -100 excluded), and "tokens", their
    count. Otherwise it is None.
    """
    d_out, d_in = W.shape
    t = {}
    t["lora_ia3"] = torch.ones(d_out)  # (o,)
    return t


def forward(m: nn.Module, x: Tensor, y: Tensor, cfg: Config) -> Tensor:
    """New output of target `m`. x: (..., i) input in the layer's dtype; y: (..., o) base output."""
    return y * m.lora_ia3.to(y.dtype)  # (..., o), the bias is scaled too, as in PEFT


def frozen_weight(m: nn.Module, cfg: Config) -> Tensor:
    """The part of W this adapter takes over, (o, i) fp32, from the stored (rounded) buffers.

    residual crop: attach and load crop the base weight to W_res = W - frozen_weight(); detach
    adds it back. residual subtract: W is never modified; forward() takes this part out of the
    output in factored form, without forming the (o, i) matrix. Raises ValueError without one.
    """
    raise ValueError("ia3 has no frozen part (residual none)")


def shared(cfg: Config, d_in: int, d_out: int) -> dict[str, Tensor]:
    """The SHARED tensors (fp32), built once per adapter and registered on every target as one
    tensor. d_in, d_out: the largest among the adapter's targets; forward() slices each target's part.
    """
    return {}
