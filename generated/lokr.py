# Code generated from specs/lokr.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""LoKr: low-rank Kronecker product, the update is a small full matrix Kronecker a rank-r matrix.

Yeh et al. 2023, Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation, arXiv 2309.14859.
Edalati et al. 2022, KronA: Parameter Efficient Tuning with Kronecker Adapter, arXiv 2212.10650.
Reference implementation: PEFT peft/tuners/lokr/layer.py, class Linear (decompose_both false).

Formula (from the composition):

    s = alpha / r
    dW = s w1 (x) w2,   w2 = w2_a w2_b        ((x) Kronecker: dW[a k + b, c n + d] = s w1[a, c] w2[b, d])
       d_out = l k, d_in = m n: (l, k), (m, n) = factorization(d_out), factorization(d_in) (PEFT's)
    y = W x + vec(s w1 X w2^T),   X = x as (m, n)   (no (d_out, d_in) matrix: three small products)

    d_out = l k and d_in = m n are split as PEFT splits them (factorization: the divisor pair
    nearest sqrt, smaller first; decompose_factor f > 0 dividing the dimension gives (f, d / f)).
    w1 (l, m) is a full matrix, w2 = w2_a w2_b (k, n) has rank r. PEFT forms the (d_out, d_in)
    matrix kron(w1, w2) every forward; here the update is applied as vec(s w1 X w2^T) with x
    read as X (m, n): x w2_b^T, then w2_a, then w1, about m n r + m r k + l m k multiply-adds a
    token instead of d_in d_out (Qwen3-0.6B q_proj 1024 -> 2048, r = 8: 0.09 M instead of 2.1 M).

Identity at init: w1 = 0, so dW = 0 (as PEFT with init_weights true; w2_a and w2_b kaiming uniform).

PEFT's defaults: r 8, alpha 8 (s = 1), decompose_factor -1, decompose_both false. Where r >=
max(k, n) / 2 PEFT holds a full (k, n) w2 instead of w2_a w2_b; here w2 stays w2_a w2_b at
rank r on every layer (the same function class, other parameters: counts and training
differ on those layers). decompose_both, rank_dropout, module_dropout, use_effective_conv2d,
init_weights other than true and Conv layers are not implemented.

Spec: basis=none, core=kronecker, modifiers=[scale alpha_over_r], residual=none, hook=output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.codegen.shapes import factor_m, factor_n  # sizes the shape expressions call
from lora_lite.config import AdapterConfig

# x (w1 (x) w2_a w2_b)^T with a backward that recomputes the per-token products
from lora_lite.runtime import kronecker_apply

NAME = "lokr"  # the spec's name
TITLE = "LoKr"  # its title
HOOK = "output"  # forward hook: forward() returns the layer's new output
CAST_INPUT = True  # the hook casts x to cfg.dtype for forward() (an input hook casts the result back)
RESIDUAL = "none"  # the base weight is never modified
RESIDUALS = ("none",)  # the values cfg.residual may take
CALIBRATION = "none"  # calibration data is accepted and ignored
STATISTICS = ()  # what init() reads from stats: calibration gathers these
TARGET_NAMES = ("\\.q_proj$", "\\.v_proj$")  # default targets: re.search on module names
LR = 0.001  # recommended AdamW learning rate
QUANTIZED_BASE = True  # bitsandbytes 4/8-bit targets work (with residual subtract where W is cropped)
USES_BASE_WEIGHT = False  # the math never reads W after init
PER_RANK = {"alpha": 1.0}  # read over r ** e: clamping r to r_c scales it by (r_c / r) ** e
EMBEDDING = False  # attach refuses nn.Embedding targets
SHARED = ()  # tensors kept once per adapter for every target (frozen; see shared())
RUNTIME_KNOBS = ()  # hyperparameters that may change after attach
RANKS = ("r",)  # hyperparameters clamped per target to min(d_in, d_out)
BOUNDS = {
    "r": (1, 65536),
    "alpha": (-1000000.0, 1000000.0),
    "decompose_factor": (-1, 65536),
}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """LoKr hyperparameters (defaults from specs/lokr.yaml)."""

    r: int = 8  # rank of w2 = w2_a w2_b
    alpha: float = 8.0  # scale numerator, s = alpha / r
    decompose_factor: int = -1  # PEFT's factorization factor; -1: factors near sqrt


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_lokr_w1": (
        ("factor_m(d_out, decompose_factor)", "factor_m(d_in, decompose_factor)"),
        "zeros",
        True,
    ),  # full left factor (l, m), zero at init (PEFT lokr_w1)
    "lora_lokr_w2_a": (
        ("factor_n(d_out, decompose_factor)", "r"),
        "kaiming_uniform",
        True,
    ),  # right factor, output side (k, r) (PEFT lokr_w2_a)
    "lora_lokr_w2_b": (
        ("r", "factor_n(d_in, decompose_factor)"),
        "kaiming_uniform",
        True,
    ),  # right factor, input side (r, n) (PEFT lokr_w2_b)
}


def shapes(cfg: Config, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor for a target whose weight is (d_out, d_in)."""
    return {
        "lora_lokr_w1": (factor_m(d_out, cfg.decompose_factor), factor_m(d_in, cfg.decompose_factor)),
        "lora_lokr_w2_a": (factor_n(d_out, cfg.decompose_factor), cfg.r),
        "lora_lokr_w2_b": (cfg.r, factor_n(d_in, cfg.decompose_factor)),
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
    t["lora_lokr_w1"] = torch.zeros(*shapes(cfg, d_in, d_out)["lora_lokr_w1"])  # (factor_m(o), factor_m(i))
    t["lora_lokr_w2_a"] = torch.empty(*shapes(cfg, d_in, d_out)["lora_lokr_w2_a"])  # (factor_n(o), r)
    nn.init.kaiming_uniform_(t["lora_lokr_w2_a"], a=math.sqrt(5))  # as nn.Linear (PEFT's lora_A init)
    t["lora_lokr_w2_b"] = torch.empty(*shapes(cfg, d_in, d_out)["lora_lokr_w2_b"])  # (r, factor_n(i))
    nn.init.kaiming_uniform_(t["lora_lokr_w2_b"], a=math.sqrt(5))  # as nn.Linear (PEFT's lora_A init)
    return t


def forward(m: nn.Module, x: Tensor, y: Tensor, cfg: Config) -> Tensor:
    """New output of target `m`. x: (..., i) input in the adapter dtype; y: (..., o) base output."""
    s = cfg.alpha / cfg.r
    # vec(s w1 X w2^T), X = x as (m, n); backward forms the per-token products again rather than keep them
    delta = kronecker_apply(x, m.lora_lokr_w1, m.lora_lokr_w2_a, m.lora_lokr_w2_b, s)  # (..., o)
    return y + delta.to(y.dtype)  # (..., o)


def frozen_weight(m: nn.Module, cfg: Config) -> Tensor:
    """The part of W this adapter takes over, (o, i) fp32, from the stored (rounded) buffers.

    residual crop: attach and load crop the base weight to W_res = W - frozen_weight(); detach
    adds it back. residual subtract: W is never modified; forward() takes this part out of the
    output in factored form, without forming the (o, i) matrix. Raises ValueError without one.
    """
    raise ValueError("lokr has no frozen part (residual none)")


def shared(cfg: Config, d_in: int, d_out: int) -> dict[str, Tensor]:
    """The SHARED tensors (fp32), built once per adapter and registered on every target as one
    tensor. d_in, d_out: the largest among the adapter's targets; forward() slices each target's part.
    """
    return {}
