# Code generated from specs/oft.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""OFT: orthogonal finetuning, a learned block-diagonal orthogonal transform of the layer's input.

Qiu et al. 2023, Controlling Text-to-Image Diffusion by Orthogonal Finetuning, arXiv 2306.07280.
Qiu et al. 2025, Orthogonal Finetuning Made Scalable, arXiv 2506.19847.
Reference implementation: PEFT peft/tuners/oft/layer.py, OFTRotationModule (block_share=False, coft=False).

Formula (from the composition):

    y = W R x + b,    R = diag(R_1, ..., R_n) over n = d_in / b blocks of b = oft_block_size inputs
    Q_j = skew(q_j)   (b, b), its strict upper triangle the learned q_j, Q_j^T = -Q_j
    R_j = (I - Q_j)(I + Q_j)^-1              (Cayley; use_cayley_neumann false)
    R_j = I + 2 Q_j + 2 Q_j^2 + ... + Q_j^k  (its Neumann series, num_cayley_neumann_terms; true)

    W R keeps the angles between W's rows' projections (R orthogonal with the exact Cayley
    transform; nearly so with the truncated series). R is built each call from the n skew blocks
    (n b^3 work) and applied to x block by block (tokens d_in b), never as a (d_in, d_in) matrix.

Identity at init: q = 0 (lora_oft_R, PEFT's oft_R.weight, the skew blocks' strict upper triangles), so Q = 0 and R = I.

PEFT's defaults: oft_block_size 32, the Cayley-Neumann series with 5 terms (PEFT's truncation,
I + 2Q + 2Q^2 + 2Q^3 + Q^4). d_in must be a multiple of oft_block_size: attach refuses the
layer where PEFT adjusts the block size with a warning. PEFT's r (set from the block size),
coft, eps, block_share and module_dropout are not implemented.

Spec: basis=none, core=orthogonal, modifiers=[], residual=none, hook=input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

NAME = "oft"  # the spec's name
TITLE = "OFT"  # its title
HOOK = "input"  # forward pre-hook: forward() returns the layer's new input
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
    "oft_block_size": (2, 65536),
    "use_cayley_neumann": (None, None),
    "num_cayley_neumann_terms": (1, 64),
}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """OFT hyperparameters (defaults from specs/oft.yaml)."""

    oft_block_size: int = 32  # inputs per orthogonal block (divides d_in)
    use_cayley_neumann: bool = True  # the truncated Neumann series instead of the exact Cayley solve
    num_cayley_neumann_terms: int = 5  # terms of that series


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_oft_R": (("d_in // oft_block_size", "oft_block_size * (oft_block_size - 1) // 2"), "core", True),
}


def shapes(cfg: Config, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor for a target whose weight is (d_out, d_in)."""
    return {
        "lora_oft_R": (d_in // cfg.oft_block_size, cfg.oft_block_size * (cfg.oft_block_size - 1) // 2),
    }


def check(cfg: Config, d_in: int, d_out: int) -> None:
    """Raise ValueError (one line) when a layer whose weight is (d_out, d_in) cannot take `cfg`.

    init() calls it at attach; load calls it before reading a target's tensors, so a checkpoint
    whose shapes fit but whose hyperparameters do not fit the layer is refused, not run.
    """
    if d_in % cfg.oft_block_size:
        raise ValueError(f"OFT needs oft_block_size dividing d_in={d_in}, got oft_block_size={cfg.oft_block_size}")


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
    b = cfg.oft_block_size
    t["lora_oft_R"] = torch.zeros(d_in // b, b * (b - 1) // 2)  # (n, b (b - 1) / 2): Q = 0, R = I
    return t


def forward(m: nn.Module, x: Tensor, cfg: Config) -> Tensor:
    """New input of target `m`. x: (..., i) input in the adapter dtype; the hook casts back."""
    b, q = cfg.oft_block_size, m.lora_oft_R  # q: (n, b (b - 1) / 2) strict upper triangles
    rows, cols = torch.triu_indices(b, b, 1, device=q.device)
    Q = torch.zeros(q.shape[0], b, b, dtype=q.dtype, device=q.device)  # (n, b, b)
    Q[:, rows, cols] = q
    Q = Q - Q.transpose(-2, -1)  # (n, b, b) skew-symmetric
    eye = torch.eye(b, dtype=q.dtype, device=q.device)  # (b, b)
    if cfg.use_cayley_neumann:  # (I + Q)(I - Q)^-1 truncated as PEFT does: I + 2Q + ... + 2Q^(k-2) + Q^(k-1)
        k = cfg.num_cayley_neumann_terms  # (k = 3 gives I + 2Q + 2Q^2 + Q^3, as PEFT's k = 4)
        R = eye + 2 * Q if k > 1 else eye.expand_as(Q)  # (n, b, b)
        if k > 2:
            P, power = Q @ Q, 2  # (n, b, b) Q^power
            R = R + 2 * P
            while power < k - 2:
                P, power = P @ Q, power + 1
                R = R + 2 * P
            R = R + P @ Q  # the last term, coefficient 1
    else:  # the exact Cayley transform, solved per block
        wide = torch.promote_types(Q.dtype, torch.float32)  # LU in fp32 or better (no bf16 kernel)
        Qw, eye_w = Q.to(wide), eye.to(wide)  # (n, b, b), (b, b)
        R = torch.linalg.solve(eye_w + Qw, eye_w - Qw, left=False).to(Q.dtype)  # (n, b, b) (I - Q)(I + Q)^-1
    # x's blocks times their R_j: never a (d_in, d_in) matrix
    xb = x.to(R.dtype).unflatten(-1, (-1, b))  # (..., n, b)
    return torch.einsum("...nk,nkc->...nc", xb, R).flatten(-2).to(x.dtype)  # (..., i)


def frozen_weight(m: nn.Module, cfg: Config) -> Tensor:
    """The part of W this adapter takes over, (o, i) fp32, from the stored (rounded) buffers.

    residual crop: attach and load crop the base weight to W_res = W - frozen_weight(); detach
    adds it back. residual subtract: W is never modified; forward() takes this part out of the
    output in factored form, without forming the (o, i) matrix. Raises ValueError without one.
    """
    raise ValueError("oft has no frozen part (residual none)")


def shared(cfg: Config, d_in: int, d_out: int) -> dict[str, Tensor]:
    """The SHARED tensors (fp32), built once per adapter and registered on every target as one
    tensor. d_in, d_out: the largest among the adapter's targets; forward() slices each target's part.
    """
    return {}
