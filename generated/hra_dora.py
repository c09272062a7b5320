# Code generated from specs/hra_dora.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""HRA-DoRA: Householder reflections of the layer's input with DoRA's learned magnitude per output row.

Yuan et al. 2024, Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder
Reflection Adaptation, arXiv 2405.17484.
Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation, arXiv 2402.09353.
Reference implementation: none (core of specs/hra.yaml on the output hook, modifier of specs/dora.yaml).

Formula (from the composition):

    y = W H_1 H_2 ... H_r x + b,    H_k = I - 2 v_k v_k^T,    v_k = u_k / |u_k|
      = y - (W V) T V^T x           (output hook: H_1 ... H_r = I - V T V^T; W V by the layer, r rows)
    y <- m / ||W'||_row * (y - b) + b    (DoRA: W' the adapted weight, m (d_out,), the norm detached)

    The adapted weight is W H with H = H_1 ... H_r orthogonal, so its row norms are W's:
    ||(W H)_i|| = ||W_i||, and the output is HRA's times the per-row gain m / ||W_i||. The
    magnitude computes the norm from the factored form W H = W - (W V) T V^T as for any core,
    so the rows' norms are W's up to rounding.

Identity at init: The reflections come in equal pairs (H = I) and m = ||W||_row, so the gain is 1 up to
rounding of the row norms.

A new composition (no PEFT equivalent). The reflections run on the output hook here (y plus
a rank-r change through W V, W V formed by the layer's forward on V's r columns), so the
magnitude can wrap them; r must be even, as for HRA.

Spec: basis=none, core=householder, modifiers=[magnitude], residual=none, hook=output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

# the layer's own reads: W through its forward (float or 4/8-bit), an nn.Embedding's token lookup
from lora_lite.runtime import base_forward, base_row_sqnorm

NAME = "hra_dora"  # the spec's name
TITLE = "HRA-DoRA"  # its title
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
PER_RANK = {}  # read over r ** e: clamping r to r_c scales it by (r_c / r) ** e
EMBEDDING = False  # attach refuses nn.Embedding targets
SHARED = ()  # tensors kept once per adapter for every target (frozen; see shared())
RUNTIME_KNOBS = ()  # hyperparameters that may change after attach
RANKS = ("r",)  # hyperparameters clamped per target to min(d_in, d_out)
BOUNDS = {"r": (2, 65536)}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """HRA-DoRA hyperparameters (defaults from specs/hra_dora.yaml)."""

    r: int = 8  # number of reflections, even


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_hra_u": (("d_in", "r"), "core", True),  # Householder vectors u_k as columns (PEFT hra_u)
    "lora_magnitude_vector": (("d_out",), "core", True),  # magnitude m, ||W||_row at init (PEFT's name)
}


def shapes(cfg: Config, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor for a target whose weight is (d_out, d_in)."""
    return {
        "lora_hra_u": (d_in, cfg.r),
        "lora_magnitude_vector": (d_out,),
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
    # pairs of equal vectors (u1, u1, u2, u2, ...): a reflection applied twice is the identity
    if cfg.r % 2:
        raise ValueError(f"r={cfg.r} is odd: the identity init pairs equal reflections, so use an even r")
    half = torch.empty(d_in, cfg.r // 2)  # (i, r/2)
    nn.init.kaiming_uniform_(half, a=math.sqrt(5))  # PEFT's init of the distinct vectors
    t["lora_hra_u"] = half.repeat_interleave(2, dim=1)  # (i, r)
    # magnitude m = ||W||_row, the row norms of the adapted weight at init (the core starts at the identity)
    t["lora_magnitude_vector"] = torch.linalg.vector_norm(W, dim=1)  # (o,)
    return t


def forward(m: nn.Module, x: Tensor, y: Tensor, cfg: Config) -> Tensor:
    """New output of target `m`. x: (..., i) input in the adapter dtype; y: (..., o) base output."""
    # x -> H_1 H_2 ... H_r x, H_k = I - 2 v_k v_k^T, v_k = u_k / |u_k| (PEFT: W' = W H_1 ... H_r).
    # Compact WY form: H_1 ... H_r = I - V T V^T, T upper triangular with T^-1 = I/2 + the strictly
    # upper part of V^T V (Joffrain et al. 2006); no (i, i) matrix, O(tokens * i * r) like LoRA
    V = m.lora_hra_u / torch.linalg.vector_norm(m.lora_hra_u, dim=0)  # (i, r) unit columns
    Vw = V.to(torch.promote_types(V.dtype, torch.float32))  # the small r x r algebra in fp32 or better
    eye = torch.eye(cfg.r, dtype=Vw.dtype, device=V.device)  # (r, r)
    T_inv = torch.triu(Vw.T @ Vw, diagonal=1) + 0.5 * eye  # (r, r)
    T = torch.linalg.solve_triangular(T_inv, eye, upper=True).to(V.dtype)  # (r, r)
    # W H x = W x - (W V) T V^T x: the layer's output y plus a rank-r change; W V through the
    # layer's own forward on V's r columns (a 4/8-bit W stays quantized)
    WV = base_forward(m, V.T).to(V.dtype)  # (r, o) (W V)^T
    delta = -((x @ V) @ T.T) @ WV  # (..., o)
    with torch.no_grad():  # the norm is a constant for autograd (DoRA sec. 4.3, as PEFT)
        # the adapted weight is the layer's weight plus Bf Af; its squared row norms are
        # ||W_i||^2 + 2 Bf_i . (W Af^T)_i + Bf_i (Af Af^T) Bf_i^T: W is only applied to Af's rows,
        # never copied, so a 4/8-bit W stays quantized (its ||W_i||^2 is cached)
        Bf, Af = -WV.T.float(), T.float() @ V.T.float()  # (o, r), (r, i): W H = W + Bf Af
        WAt = base_forward(m, Af).T  # (o, k) W Af^T by the layer's own forward, bias removed
        sq = base_row_sqnorm(m) + 2 * (WAt * Bf).sum(1) + ((Bf @ (Af @ Af.T)) * Bf).sum(1)  # (o,)
        norm = sq.clamp_min(0.0).sqrt()  # (o,) row norms of the adapted weight
    scale = m.lora_magnitude_vector / norm.to(m.lora_magnitude_vector.dtype)  # (o,)
    # y + delta is formed in the wider of the two dtypes (a bf16 y is read once, not cast first)
    bias = getattr(m, "bias", None)
    if bias is None:
        return (scale * (y + delta)).to(y.dtype)  # (..., o)
    return (scale * ((y - bias) + delta)).to(y.dtype) + bias  # (..., o); the bias passes unscaled


def frozen_weight(m: nn.Module, cfg: Config) -> Tensor:
    """The part of W this adapter takes over, (o, i) fp32, from the stored (rounded) buffers.

    residual crop: attach and load crop the base weight to W_res = W - frozen_weight(); detach
    adds it back. residual subtract: W is never modified; forward() takes this part out of the
    output in factored form, without forming the (o, i) matrix. Raises ValueError without one.
    """
    raise ValueError("hra_dora has no frozen part (residual none)")


def shared(cfg: Config, d_in: int, d_out: int) -> dict[str, Tensor]:
    """The SHARED tensors (fp32), built once per adapter and registered on every target as one
    tensor. d_in, d_out: the largest among the adapter's targets; forward() slices each target's part.
    """
    return {}
