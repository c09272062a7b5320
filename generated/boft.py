# Code generated from specs/boft.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""BOFT: butterfly orthogonal finetuning, permuted block-diagonal Cayley rotations of the input and an output scale.

Liu et al. 2023, Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization, arXiv
2311.06243.
Reference implementation: PEFT peft/tuners/boft/layer.py, class Linear.

Formula (from the composition):

    y = s * ((x R) W^T) + b,    x a row (PEFT's x @ boft_rotation),    R = B_(f-1) ... B_1 B_0
    B_k = P_k diag(R_k1, ..., R_kn) P_k^T,    f = boft_n_butterfly_factor, n = d_in / b blocks of b = boft_block_size
    P_k: block j of B_k takes the half-blocks (b / 2 inputs) 2^k apart in a group of 2^k b inputs (P_0 = I)
    R_kj = (I - Q_kj)(I + Q_kj)^-1,    Q_kj = (M_kj - M_kj^T) / 2 (skew part of the learned M_kj)
      = s * (y - b + (x R - x) W^T) + b    (output hook: the layer's forward on the change x R - x)

    Each factor's f x n b x b rotations are built each call by small solves; x meets the factors
    one at a time, each as a permutation (a reshape and a transpose), n b x b products and the
    inverse permutation, so the (d_in, d_in) matrix is never formed (PEFT forms it and multiplies
    every token by it). With one factor (the default) R is block diagonal. The change x R - x
    goes through the layer's own forward (W never copied, a 4/8-bit W stays quantized).

Identity at init: M = 0, so every R_kj = I and R = I, and s = 1.

As PEFT: d_in must be a multiple of boft_block_size * 2^(boft_n_butterfly_factor - 1), and
with two or more factors boft_block_size must be even (attach refuses the layer otherwise).
Factor k of lora_boft_R is PEFT's boft_R[k] (PEFT's factors >= 2 need its CUDA extension;
without it PEFT falls back to one factor). Only the skew part of each learned b x b block
acts, as in PEFT (whose count this matches). boft_dropout is not implemented.

Spec: basis=none, core=butterfly, modifiers=[], residual=none, hook=output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

# the layer's own reads: W through its forward (float or 4/8-bit), an nn.Embedding's token lookup
from lora_lite.runtime import base_forward

NAME = "boft"  # the spec's name
TITLE = "BOFT"  # its title
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
PER_RANK = {}  # read over r ** e: clamping r to r_c scales it by (r_c / r) ** e
EMBEDDING = False  # attach refuses nn.Embedding targets
SHARED = ()  # tensors kept once per adapter for every target (frozen; see shared())
RUNTIME_KNOBS = ()  # hyperparameters that may change after attach
RANKS = ()  # hyperparameters clamped per target to min(d_in, d_out)
BOUNDS = {
    "boft_block_size": (2, 65536),
    "boft_n_butterfly_factor": (1, 16),
}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """BOFT hyperparameters (defaults from specs/boft.yaml)."""

    boft_block_size: int = 4  # inputs per orthogonal block (divides d_in)
    boft_n_butterfly_factor: int = 1  # butterfly factors (1: block diagonal)


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_boft_R": (
        ("boft_n_butterfly_factor", "d_in // boft_block_size", "boft_block_size", "boft_block_size"),
        "core",
        True,
    ),  # one b x b block per factor and block (PEFT boft_R)
    "lora_boft_s": (("d_out", "1"), "ones", True),  # output scale (PEFT boft_s)
}


def shapes(cfg: Config, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor for a target whose weight is (d_out, d_in)."""
    return {
        "lora_boft_R": (
            cfg.boft_n_butterfly_factor,
            d_in // cfg.boft_block_size,
            cfg.boft_block_size,
            cfg.boft_block_size,
        ),
        "lora_boft_s": (d_out, 1),
    }


def check(cfg: Config, d_in: int, d_out: int) -> None:
    """Raise ValueError (one line) when a layer whose weight is (d_out, d_in) cannot take `cfg`.

    init() calls it at attach; load calls it before reading a target's tensors, so a checkpoint
    whose shapes fit but whose hyperparameters do not fit the layer is refused, not run.
    """
    b, f = cfg.boft_block_size, cfg.boft_n_butterfly_factor
    if d_in % (b * 2 ** (f - 1)):
        raise ValueError(
            f"BOFT needs boft_block_size * 2^(boft_n_butterfly_factor - 1) = {b} * {2 ** (f - 1)} dividing d_in={d_in}"
        )
    if f > 1 and b % 2:
        raise ValueError(f"BOFT with boft_n_butterfly_factor={f} > 1 needs an even boft_block_size, got {b}")


# i: d_in, o: d_out, r: rank, ...: leading (batch, token) dims
def init(W: Tensor, cfg: Config, stats: dict | None = None) -> dict[str, Tensor]:
    """Initial adapter tensors (fp32) for one target. W: (o, i) base weight, fp32, dequantized.

    `stats` holds statistics of this layer's input, gathered on the intact model, when
    calibration data was given: "second_moment" (i, i) = mean of x x^T and "mean" (i,) = mean
    of x over the counted tokens (padding and labels == -100 excluded), and "tokens", their
    count. Otherwise it is None.
    """
    d_out, d_in = W.shape
    check(cfg, d_in, d_out)
    t = {}
    t["lora_boft_s"] = torch.ones(d_out, 1)  # (o, 1)
    b, f = cfg.boft_block_size, cfg.boft_n_butterfly_factor
    t["lora_boft_R"] = torch.zeros(f, d_in // b, b, b)  # (f, n, b, b): M = 0, so every R_kj = I and R = I
    return t


def forward(m: nn.Module, x: Tensor, y: Tensor, cfg: Config) -> Tensor:
    """New output of target `m`. x: (..., i) input in the adapter dtype; y: (..., o) base output."""
    b, M = cfg.boft_block_size, m.lora_boft_R  # M: (f, n, b, b), the blocks of each butterfly factor
    Mw = M.to(torch.promote_types(M.dtype, torch.float32))  # the small solves in fp32 or better (no bf16 LU)
    Q = 0.5 * (Mw - Mw.transpose(-2, -1))  # (f, n, b, b) skew-symmetric parts
    eye = torch.eye(b, dtype=Mw.dtype, device=M.device)  # (b, b)
    R = torch.linalg.solve(eye + Q, eye - Q, left=False).to(x.dtype)  # (f, n, b, b) Cayley: (I - Q)(I + Q)^-1
    xr = x  # (..., i)
    for k in reversed(range(M.shape[0])):  # x R = (x B_(f-1)) ... B_0: the widest butterfly first
        stride = 2**k  # factor k pairs half-blocks this far apart (k = 0: none, B_0 is block diagonal)
        if k:  # times P_k: block (g, j) of B_k holds half-blocks j and j + stride of group g (stride b inputs)
            xr = xr.unflatten(-1, (-1, 2, stride, b // 2)).transpose(-3, -2).flatten(-4)  # (..., i) permuted
        xr = torch.einsum("...nk,nkc->...nc", xr.unflatten(-1, (-1, b)), R[k]).flatten(-2)  # (..., i) blockwise
        if k:  # times P_k^T: back to the input order
            xr = xr.unflatten(-1, (-1, stride, 2, b // 2)).transpose(-3, -2).flatten(-4)  # (..., i)
    # W (x R)^T = W x^T + W (x R - x)^T: the base output plus the layer's forward on the change (no bias)
    wx = (y if m.bias is None else y - m.bias).to(M.dtype) + base_forward(m, xr - x).to(M.dtype)  # (..., o)
    out = wx * m.lora_boft_s[:, 0]  # (..., o) the learned output scale; the bias passes unscaled
    return (out if m.bias is None else out + m.bias).to(y.dtype)  # (..., o)


def frozen_weight(m: nn.Module, cfg: Config) -> Tensor:
    """The part of W this adapter takes over, (o, i) fp32, from the stored (rounded) buffers.

    residual crop: attach and load crop the base weight to W_res = W - frozen_weight(); detach
    adds it back. residual subtract: W is never modified; forward() takes this part out of the
    output in factored form, without forming the (o, i) matrix. Raises ValueError without one.
    """
    raise ValueError("boft has no frozen part (residual none)")


def shared(cfg: Config, d_in: int, d_out: int) -> dict[str, Tensor]:
    """The SHARED tensors (fp32), built once per adapter and registered on every target as one
    tensor. d_in, d_out: the largest among the adapter's targets; forward() slices each target's part.
    """
    return {}
