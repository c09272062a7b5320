# Code generated from specs/vera.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""VeRA: one frozen random low-rank pair shared by every layer, adapted by two trainable scaling vectors per layer.

Kopiczko et al. 2023, VeRA: Vector-based Random Matrix Adaptation, arXiv 2310.11454.
Reference implementation: PEFT peft/tuners/vera/layer.py, class Linear; peft/tuners/vera/model.py, _init_vera_A_vera_B.

Formula (from the composition):

    A (r, d_in_max), B (d_out_max, r): frozen, one pair for all targets, kaiming-uniform from projection_prng_key
    y = W x + lambda_b * (B[:d_out] (lambda_d * (A[:, :d_in] x)))

    A (r, d_in_max) and B (d_out_max, r) are drawn once per adapter from a torch.Generator seeded
    with projection_prng_key (A first, then B), d_in_max and d_out_max the largest among the
    targets, and every target uses A[:, :d_in] and B[:d_out] (PEFT's slices). Only lambda_d (r,)
    and lambda_b (d_out,) train: r + d_out numbers per layer. There is no alpha / r scale, and r
    is not clamped to the layer (a shared A of r rows serves every target), as in PEFT.

Identity at init: lambda_b = 0, so the update is zero.

A and B exist once in memory (every target holds the same frozen tensor) and once in a
checkpoint (as shared.lora_vera_A and shared.lora_vera_B), as PEFT's save_projection=True.
PEFT's vera_dropout (default 0) is not implemented.

Spec: basis=none, core=shared_lowrank, modifiers=[], residual=none, hook=output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

NAME = "vera"  # the spec's name
TITLE = "VeRA"  # its title
HOOK = "output"  # forward hook: forward() returns the layer's new output
CAST_INPUT = True  # the hook casts x to cfg.dtype for forward() (an input hook casts the result back)
RESIDUAL = "none"  # the base weight is never modified
RESIDUALS = ("none",)  # the values cfg.residual may take
CALIBRATION = "none"  # calibration data is accepted and ignored
STATISTICS = ()  # what init() reads from stats: calibration gathers these
TARGET_NAMES = ("\\.q_proj$", "\\.v_proj$")  # default targets: re.search on module names
LR = 0.01  # recommended AdamW learning rate
QUANTIZED_BASE = True  # bitsandbytes 4/8-bit targets work (with residual subtract where W is cropped)
USES_BASE_WEIGHT = False  # the math never reads W after init
PER_RANK = {}  # read over r ** e: clamping r to r_c scales it by (r_c / r) ** e
EMBEDDING = False  # attach refuses nn.Embedding targets
SHARED = ("lora_vera_A", "lora_vera_B")  # tensors kept once per adapter for every target (frozen; see shared())
RUNTIME_KNOBS = ()  # hyperparameters that may change after attach
RANKS = ()  # hyperparameters clamped per target to min(d_in, d_out)
BOUNDS = {
    "r": (1, 65536),
    "d_initial": (-1000000.0, 1000000.0),
    "projection_prng_key": (0, 2147483647),
}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """VeRA hyperparameters (defaults from specs/vera.yaml)."""

    r: int = 256  # rank of the shared random pair (not clamped per layer)
    d_initial: float = 0.1  # initial value of every entry of lambda_d
    projection_prng_key: int = 0  # seed of the generator that draws A and B


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_vera_A": (("r", "d_in"), "core", False),  # shared random down-projection, (r, largest d_in) (PEFT vera_A)
    "lora_vera_B": (("d_out", "r"), "core", False),  # shared random up-projection, (largest d_out, r) (PEFT vera_B)
    "lora_vera_lambda_d": (("r",), "core", True),  # scales A's r outputs, d_initial at init (PEFT vera_lambda_d)
    "lora_vera_lambda_b": (("d_out",), "zeros", True),  # scales the update's outputs, zero at init (PEFT vera_lambda_b)
}


def shapes(cfg: Config, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor for a target whose weight is (d_out, d_in)."""
    return {
        "lora_vera_A": (cfg.r, d_in),
        "lora_vera_B": (d_out, cfg.r),
        "lora_vera_lambda_d": (cfg.r,),
        "lora_vera_lambda_b": (d_out,),
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
    t["lora_vera_lambda_b"] = torch.zeros(d_out)  # (o,)
    t["lora_vera_lambda_d"] = torch.full((cfg.r,), cfg.d_initial)  # (r,) PEFT's d_initial
    return t


def forward(m: nn.Module, x: Tensor, y: Tensor, cfg: Config) -> Tensor:
    """New output of target `m`. x: (..., i) input in the adapter dtype; y: (..., o) base output."""
    i, o = x.shape[-1], m.lora_vera_lambda_b.shape[0]
    h = (x @ m.lora_vera_A[:, :i].T) * m.lora_vera_lambda_d  # (..., r): this target's columns of A
    delta = (h @ m.lora_vera_B[:o].T) * m.lora_vera_lambda_b  # (..., o): this target's rows of B
    return y + delta.to(y.dtype)  # (..., o)


def frozen_weight(m: nn.Module, cfg: Config) -> Tensor:
    """The part of W this adapter takes over, (o, i) fp32, from the stored (rounded) buffers.

    residual crop: attach and load crop the base weight to W_res = W - frozen_weight(); detach
    adds it back. residual subtract: W is never modified; forward() takes this part out of the
    output in factored form, without forming the (o, i) matrix. Raises ValueError without one.
    """
    raise ValueError("vera has no frozen part (residual none)")


def shared(cfg: Config, d_in: int, d_out: int) -> dict[str, Tensor]:
    """The SHARED tensors (fp32), built once per adapter and registered on every target as one
    tensor. d_in, d_out: the largest among the adapter's targets; forward() slices each target's part.
    """
    # one generator seeded with projection_prng_key draws A, then B (PEFT's _kaiming_init:
    # uniform in +-sqrt(6 / fan_in), fan_in = d_in for A (r, d_in), r for B (d_out, r))
    g = torch.Generator().manual_seed(cfg.projection_prng_key)
    bound_A, bound_B = math.sqrt(6.0 / d_in), math.sqrt(6.0 / cfg.r)
    t = {}
    t["lora_vera_A"] = torch.empty(cfg.r, d_in).uniform_(-bound_A, bound_A, generator=g)  # (r, i_max)
    t["lora_vera_B"] = torch.empty(d_out, cfg.r).uniform_(-bound_B, bound_B, generator=g)  # (o_max, r)
    return t
