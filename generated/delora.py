# Code generated from specs/delora.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""DeLoRA: decoupled low-rank adaptation, a normalised rank-r update whose strength is one learned lambda.

Bini et al. 2025, Decoupling Angles and Strength in Low-rank Adaptation, arXiv 2503.18225.
Reference implementation: PEFT peft/tuners/delora/layer.py, class DeloraLinear.

Formula (from the composition):

    y = W x + B diag(g) A (w * x),    g_k = lambda / (r |a_k| |b_k|)    (DeLoRA; w_j = ||W[:, j]||)

    a_k: row k of A, b_k: column k of B, w_j = ||W[:, j]|| the norm of input channel j of W
    (frozen at init). Each rank-1 term is normalised, so ||Delta W|| is bounded by lambda times
    the weight norm: the angle (A, B) and the strength (lambda) are learned separately.

Identity at init: B = 0, so the update is zero (its column norms are clamped at 1e-4, as in PEFT, so g stays
finite); the paper instead subtracts a frozen copy of the initial update.

w is computed from the base weight at attach time, so a checkpoint refuses a base whose
weights differ.

Spec: basis=none, core=lowrank, modifiers=[delora], residual=none, hook=output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

NAME = "delora"  # the spec's name
TITLE = "DeLoRA"  # its title
HOOK = "output"  # forward hook: forward() returns the layer's new output
CAST_INPUT = True  # the hook casts x to cfg.dtype for forward() (an input hook casts the result back)
RESIDUAL = "none"  # the base weight is never modified
RESIDUALS = ("none",)  # the values cfg.residual may take
CALIBRATION = "none"  # calibration data is accepted and ignored
STATISTICS = ()  # what init() reads from stats: calibration gathers these
TARGET_NAMES = ("\\.q_proj$", "\\.v_proj$")  # default targets: re.search on module names
LR = 0.001  # recommended AdamW learning rate
QUANTIZED_BASE = True  # bitsandbytes 4/8-bit targets work (with residual subtract where W is cropped)
USES_BASE_WEIGHT = True  # the math reads W: load refuses a base whose weights differ
PER_RANK = {"lambda0": 1.0}  # read over r ** e: clamping r to r_c scales it by (r_c / r) ** e
EMBEDDING = False  # attach refuses nn.Embedding targets
SHARED = ()  # tensors kept once per adapter for every target (frozen; see shared())
RUNTIME_KNOBS = ()  # hyperparameters that may change after attach
RANKS = ("r",)  # hyperparameters clamped per target to min(d_in, d_out)
BOUNDS = {"r": (1, 65536), "lambda0": (-1000000.0, 1000000.0)}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """DeLoRA hyperparameters (defaults from specs/delora.yaml)."""

    r: int = 8  # rank of the update
    lambda0: float = 15.0  # initial lambda (PEFT delora_lambda)


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_A": (("r", "d_in"), "kaiming_uniform", True),  # down-projection (PEFT delora_A)
    "lora_B": (("d_out", "r"), "zeros", True),  # up-projection (PEFT delora_B)
    "lora_lambda": (("1",), "core", True),  # strength lambda, lambda0 at init (PEFT delora_lambda)
    "lora_w_norm": (("d_in",), "core", False),  # input-channel norms of W (PEFT delora_w_norm)
}


def shapes(cfg: Config, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor for a target whose weight is (d_out, d_in)."""
    return {
        "lora_A": (cfg.r, d_in),
        "lora_B": (d_out, cfg.r),
        "lora_lambda": (1,),
        "lora_w_norm": (d_in,),
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
    t["lora_A"] = torch.empty(cfg.r, d_in)  # (r, i)
    nn.init.kaiming_uniform_(t["lora_A"], a=math.sqrt(5))  # as nn.Linear (PEFT's lora_A init)
    t["lora_B"] = torch.zeros(d_out, cfg.r)  # (o, r)
    # lambda starts at lambda0 (PEFT's delora_lambda); w_norm is frozen: ||W[:, j]|| per input channel
    t["lora_lambda"] = torch.full((1,), float(cfg.lambda0))  # (1,)
    t["lora_w_norm"] = torch.linalg.vector_norm(W, dim=0)  # (i,)
    return t


def forward(m: nn.Module, x: Tensor, y: Tensor, cfg: Config) -> Tensor:
    """New output of target `m`. x: (..., i) input in the adapter dtype; y: (..., o) base output."""
    # norms clamped at 1e-4 as in PEFT: with B = 0 at init the scale stays finite, the update zero.
    # The scale g and the small factor h stay fp32: (1e-4)^2 underflows fp16 and g can exceed its range
    a_norm = torch.linalg.vector_norm(m.lora_A.float(), dim=1).clamp_min(1e-4)  # (r,) rows of A
    b_norm = torch.linalg.vector_norm(m.lora_B.float(), dim=0).clamp_min(1e-4)  # (r,) columns of B
    g = m.lora_lambda.float() / cfg.r / (a_norm * b_norm)  # (r,) fp32
    A_w = m.lora_A * m.lora_w_norm  # (r, i) A diag(w): (w * x) A^T = x A_w^T, w applied to A's r rows
    h = (x @ A_w.T).float() * g  # (..., r) fp32
    delta = h @ m.lora_B.float().T  # (..., o) fp32
    return y + delta.to(y.dtype)  # (..., o)


def frozen_weight(m: nn.Module, cfg: Config) -> Tensor:
    """The part of W this adapter takes over, (o, i) fp32, from the stored (rounded) buffers.

    residual crop: attach and load crop the base weight to W_res = W - frozen_weight(); detach
    adds it back. residual subtract: W is never modified; forward() takes this part out of the
    output in factored form, without forming the (o, i) matrix. Raises ValueError without one.
    """
    raise ValueError("delora has no frozen part (residual none)")


def shared(cfg: Config, d_in: int, d_out: int) -> dict[str, Tensor]:
    """The SHARED tensors (fp32), built once per adapter and registered on every target as one
    tensor. d_in, d_out: the largest among the adapter's targets; forward() slices each target's part.
    """
    return {}
