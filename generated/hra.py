# Code generated from specs/hra.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""HRA: Householder reflection adaptation, r learned reflections applied to the layer input.

Yuan et al. 2024, Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder
Reflection Adaptation, arXiv 2405.17484.
Joffrain et al. 2006, Accumulating Householder transformations, revisited (the compact WY form
used here).
Reference implementation: PEFT peft/tuners/hra/layer.py, class HRALinear (apply_GS=False).

Formula (from the composition):

    y = W H_1 H_2 ... H_r x + b,    H_k = I - 2 v_k v_k^T,    v_k = u_k / |u_k|

    W H_1 ... H_r is an orthogonal transform of W's input side (PEFT's side). It is applied to x
    in compact WY form, H_1 ... H_r = I - V T V^T with V = [v_1 ... v_r] (d_in, r) and T (r, r)
    upper triangular, T^-1 = I/2 + the strictly upper part of V^T V, formed each call from the r
    vectors: the cost is O(tokens d_in r) like LoRA, never a (d_in, d_in) matrix.

Identity at init: the vectors come in equal pairs (u1, u1, u2, u2, ...); a reflection applied twice is I.

r must be even for that init: an odd r is refused (PEFT warns and starts from a random
orthogonal transform instead). No Gram-Schmidt option (PEFT's apply_GS).

Spec: basis=none, core=householder, modifiers=[], residual=none, hook=input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

NAME = "hra"  # the spec's name
TITLE = "HRA"  # its title
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
RANKS = ("r",)  # hyperparameters clamped per target to min(d_in, d_out)
BOUNDS = {"r": (2, 65536)}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """HRA hyperparameters (defaults from specs/hra.yaml)."""

    r: int = 8  # number of reflections, even


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_hra_u": (("d_in", "r"), "core", True),  # Householder vectors u_k as columns (PEFT hra_u)
}


def shapes(cfg: Config, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor for a target whose weight is (d_out, d_in)."""
    return {
        "lora_hra_u": (d_in, cfg.r),
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
    return t


def forward(m: nn.Module, x: Tensor, cfg: Config) -> Tensor:
    """New input of target `m`. x: (..., i) input in the adapter dtype; the hook casts back."""
    # x -> H_1 H_2 ... H_r x, H_k = I - 2 v_k v_k^T, v_k = u_k / |u_k| (PEFT: W' = W H_1 ... H_r).
    # Compact WY form: H_1 ... H_r = I - V T V^T, T upper triangular with T^-1 = I/2 + the strictly
    # upper part of V^T V (Joffrain et al. 2006); no (i, i) matrix, O(tokens * i * r) like LoRA
    V = m.lora_hra_u / torch.linalg.vector_norm(m.lora_hra_u, dim=0)  # (i, r) unit columns
    Vw = V.to(torch.promote_types(V.dtype, torch.float32))  # the small r x r algebra in fp32 or better
    eye = torch.eye(cfg.r, dtype=Vw.dtype, device=V.device)  # (r, r)
    T_inv = torch.triu(Vw.T @ Vw, diagonal=1) + 0.5 * eye  # (r, r)
    T = torch.linalg.solve_triangular(T_inv, eye, upper=True).to(V.dtype)  # (r, r)
    return x - ((x @ V) @ T.T) @ V.T  # (..., i)


def frozen_weight(m: nn.Module, cfg: Config) -> Tensor:
    """The part of W this adapter takes over, (o, i) fp32, from the stored (rounded) buffers.

    residual crop: attach and load crop the base weight to W_res = W - frozen_weight(); detach
    adds it back. residual subtract: W is never modified; forward() takes this part out of the
    output in factored form, without forming the (o, i) matrix. Raises ValueError without one.
    """
    raise ValueError("hra has no frozen part (residual none)")


def shared(cfg: Config, d_in: int, d_out: int) -> dict[str, Tensor]:
    """The SHARED tensors (fp32), built once per adapter and registered on every target as one
    tensor. d_in, d_out: the largest among the adapter's targets; forward() slices each target's part.
    """
    return {}
