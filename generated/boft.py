# Code generated from specs/boft.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""BOFT: butterfly orthogonal finetuning, Cayley rotations of blocks of the layer's input with a learned output scale.

Liu et al. 2023, Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization, arXiv
2311.06243.
Reference implementation: PEFT peft/tuners/boft/layer.py, class Linear (boft_n_butterfly_factor=1).

Formula (from the composition):

    y = s * (W R x) + b,    R = diag(R_1, ..., R_n), n = d_in / b blocks of b = boft_block_size inputs
    R_j = (I - Q_j)(I + Q_j)^-1,    Q_j = (M_j - M_j^T) / 2 (skew part of the learned M_j)
      = s * (y - b + W (R x - x)) + b    (output hook: the layer's forward on the change R x - x)

    With one butterfly factor R is block diagonal (PEFT's permutations are the identity). R is
    built each call from n b x b solves and applied to x block by block; the change R x - x goes
    through the layer's own forward (W never copied, a 4/8-bit W stays quantized), where PEFT
    forms the (d_in, d_in) block-diagonal matrix and multiplies every token by it.

Identity at init: M = 0, so R = I, and s = 1.

Only one butterfly factor is implemented (boft_n_butterfly_factor = 1, PEFT's default, and
what PEFT itself falls back to without its CUDA extension). d_in must be a multiple of
boft_block_size (attach refuses the layer, as PEFT). Only the skew part of each learned b x b
block acts, as in PEFT (whose count this matches). boft_dropout is not implemented.

Spec: basis=none, core=butterfly, modifiers=[], residual=none, hook=output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig
from lora_lite.runtime import base_forward  # read W through the layer (float or 4/8-bit)

NAME = "boft"  # the spec's name
TITLE = "BOFT"  # its title
HOOK = "output"  # forward hook: forward() returns the layer's new output
CAST_INPUT = True  # the hook casts x to cfg.dtype for forward() (an input hook casts the result back)
RESIDUAL = "none"  # the base weight is never modified
RESIDUALS = ("none",)  # the values cfg.residual may take
CALIBRATION = "none"  # calibration data is accepted and ignored
TARGET_NAMES = ("\\.q_proj$", "\\.v_proj$")  # default targets: re.search on module names
LR = 0.001  # recommended AdamW learning rate
QUANTIZED_BASE = True  # bitsandbytes 4/8-bit targets work (with residual subtract where W is cropped)
USES_BASE_WEIGHT = False  # the math never reads W after init
SHARED = ()  # tensors kept once per adapter for every target (frozen; see shared())
RUNTIME_KNOBS = ()  # hyperparameters that may change after attach
RANKS = ()  # hyperparameters clamped per target to min(d_in, d_out)
BOUNDS = {
    "boft_block_size": (2, 65536),
    "boft_n_butterfly_factor": (1, 1),
}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """BOFT hyperparameters (defaults from specs/boft.yaml)."""

    boft_block_size: int = 4  # inputs per orthogonal block (divides d_in)
    boft_n_butterfly_factor: int = 1  # butterfly factors (1: block diagonal)


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_boft_R": (("d_in // boft_block_size", "boft_block_size", "boft_block_size"), "core", True),  # PEFT boft_R[0]
    "lora_boft_s": (("d_out", "1"), "ones", True),  # output scale (PEFT boft_s)
}


def shapes(cfg: Config, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor for a target whose weight is (d_out, d_in)."""
    return {
        "lora_boft_R": (d_in // cfg.boft_block_size, cfg.boft_block_size, cfg.boft_block_size),
        "lora_boft_s": (d_out, 1),
    }


# i: d_in, o: d_out, r: rank, ...: leading (batch, token) dims
def init(W: Tensor, cfg: Config, stats: dict | None = None) -> dict[str, Tensor]:
    """Initial adapter tensors (fp32) for one target. W: (o, i) base weight, fp32, dequantized.

    `stats` holds statistics of this layer's input, gathered on the intact model, when
    calibration data was given: "second_moment" (i, i) = mean of x x^T and "mean" (i,) = mean
    of x over the counted tokens (padding and labels == -100 excluded), and "tokens", their
    count. Otherwise it is None.
    """
    d_out, d_in = W.shape
    if d_in % cfg.boft_block_size:
        raise ValueError(f"BOFT needs boft_block_size dividing d_in={d_in}, got boft_block_size={cfg.boft_block_size}")
    if cfg.boft_n_butterfly_factor != 1:
        raise ValueError(f"BOFT: only one butterfly factor is implemented, got {cfg.boft_n_butterfly_factor}")
    t = {}
    t["lora_boft_s"] = torch.ones(d_out, 1)  # (o, 1)
    b = cfg.boft_block_size
    t["lora_boft_R"] = torch.zeros(d_in // b, b, b)  # (n, b, b): M = 0, so R = I
    return t


def forward(m: nn.Module, x: Tensor, y: Tensor, cfg: Config) -> Tensor:
    """New output of target `m`. x: (..., i) input in the adapter dtype; y: (..., o) base output."""
    b, M = cfg.boft_block_size, m.lora_boft_R  # M: (n, b, b), the one butterfly factor's blocks
    Mw = M.to(torch.promote_types(M.dtype, torch.float32))  # the small solves in fp32 or better (no bf16 LU)
    Q = 0.5 * (Mw - Mw.transpose(-2, -1))  # (n, b, b) skew-symmetric part
    eye = torch.eye(b, dtype=Mw.dtype, device=M.device)  # (b, b)
    R = torch.linalg.solve(eye + Q, eye - Q, left=False).to(x.dtype)  # (n, b, b) Cayley: (I - Q)(I + Q)^-1
    xr = torch.einsum("...nk,nkc->...nc", x.unflatten(-1, (-1, b)), R).flatten(-2)  # (..., i) R x, blockwise
    # W R x = W x + W (R x - x): the base output plus the layer's forward on the change (no bias)
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
