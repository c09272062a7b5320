# Code generated from specs/dora.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""DoRA: weight-decomposed low-rank adaptation, a LoRA update with a learned magnitude per output row.

Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation, arXiv 2402.09353.
Reference implementation: PEFT peft/tuners/lora/dora.py, class DoraLinearLayer.

Formula (from the composition):

    s = alpha / r
    y = W x + s B A x
    y <- m / ||W'||_row * (y - b) + b    (DoRA: W' the adapted weight, m (d_out,), the norm detached)

    ||.||_row is the norm of each output row of W + s B A (the paper's column norm, as it writes
    W as (d_in, d_out)); it is recomputed every call and detached from the graph (paper sec. 4.3,
    as PEFT): m gets its gradient through the scale, A and B through the update. Squared, row i is
    ||W_i||^2 + 2 s B_i (W A^T)_i + s^2 B_i (A A^T) B_i^T, so W is only applied to A's r rows.

Identity at init: B = 0 and m = ||W||_row, so the scale is 1 and the update zero.

The forward reads the base weight W (to form the norm), so a checkpoint refuses a base whose
weights differ. W A^T comes from the layer's own forward on A's rows, in W's dtype (a 4/8-bit
W is never dequantized into a copy, a bf16 W never copied to fp32); ||W_i||^2 is reduced in
fp32 every call from a float W (so it follows any write to W) and cached for a 4/8-bit W
(runtime.base_row_sqnorm says which writes that cache sees). The norm follows the current W,
A and B.

Spec: basis=none, core=lowrank, modifiers=[scale alpha_over_r, magnitude], residual=none,
hook=output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

# the layer's own reads: W through its forward (float or 4/8-bit), an nn.Embedding's token lookup
from lora_lite.runtime import base_forward, base_row_sqnorm, embedding_lookup, is_embedding

NAME = "dora"  # the spec's name
TITLE = "DoRA"  # its title
HOOK = "output"  # forward hook: forward() returns the layer's new output
CAST_INPUT = True  # the hook casts x to cfg.dtype for forward() (an input hook casts the result back)
RESIDUAL = "none"  # the base weight is never modified
RESIDUALS = ("none",)  # the values cfg.residual may take
CALIBRATION = "none"  # calibration data is accepted and ignored
STATISTICS = ()  # what init() reads from stats: calibration gathers these
TARGET_NAMES = ("\\.q_proj$", "\\.v_proj$")  # default targets: re.search on module names
LR = 0.0001  # recommended AdamW learning rate
QUANTIZED_BASE = True  # bitsandbytes 4/8-bit targets work (with residual subtract where W is cropped)
USES_BASE_WEIGHT = True  # the math reads W: load refuses a base whose weights differ
PER_RANK = {"alpha": 1.0}  # read over r ** e: clamping r to r_c scales it by (r_c / r) ** e
EMBEDDING = True  # nn.Embedding targets work (token ids in; PEFT's layout and init)
SHARED = ()  # tensors kept once per adapter for every target (frozen; see shared())
RUNTIME_KNOBS = ()  # hyperparameters that may change after attach
RANKS = ("r",)  # hyperparameters clamped per target to min(d_in, d_out)
BOUNDS = {"r": (1, 65536), "alpha": (-1000000.0, 1000000.0)}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """DoRA hyperparameters (defaults from specs/dora.yaml)."""

    r: int = 8  # rank of the update
    alpha: float = 16.0  # scale numerator, s = alpha / r


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_A": (("r", "d_in"), "kaiming_uniform", True),  # down-projection
    "lora_B": (("d_out", "r"), "zeros", True),  # up-projection
    "lora_magnitude_vector": (("d_out",), "core", True),  # magnitude m, ||W||_row at init (PEFT's name)
}


def shapes(cfg: Config, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor for a target whose weight is (d_out, d_in)."""
    return {
        "lora_A": (cfg.r, d_in),
        "lora_B": (d_out, cfg.r),
        "lora_magnitude_vector": (d_out,),
    }


def check(cfg: Config, d_in: int, d_out: int) -> None:
    """Raise ValueError (one line) when a layer whose weight is (d_out, d_in) cannot take `cfg`.

    init() calls it at attach; load calls it before reading a target's tensors, so a checkpoint
    whose shapes fit but whose hyperparameters do not fit the layer is refused, not run.
    """
    return None  # every layer takes it


# i: d_in, o: d_out, r: rank, ...: leading (batch, token) dims
def init(W: Tensor, cfg: Config, stats: dict | None = None, embedding: bool = False) -> dict[str, Tensor]:
    """Initial adapter tensors (fp32) for one target. W: (o, i) base weight, fp32, dequantized.

    `stats` holds statistics of this layer's input, gathered on the intact model, when
    calibration data was given: "second_moment" (i, i) = mean of x x^T and "mean" (i,) = mean
    of x over the counted tokens (padding and labels == -100 excluded), and "tokens", their
    count. Otherwise it is None.
    `embedding`: the target is an nn.Embedding, W its weight transposed, (embedding_dim,
    num_embeddings): o = embedding_dim, i = num_embeddings.
    """
    d_out, d_in = W.shape
    t = {}
    t["lora_A"] = torch.empty(cfg.r, d_in)  # (r, i)
    nn.init.kaiming_uniform_(t["lora_A"], a=math.sqrt(5))  # as nn.Linear (PEFT's lora_A init)
    t["lora_B"] = torch.zeros(d_out, cfg.r)  # (o, r)
    # magnitude m = ||W||_row, the row norms of the adapted weight at init (the core starts at the identity)
    t["lora_magnitude_vector"] = torch.linalg.vector_norm(W, dim=1)  # (o,)
    if embedding:  # an nn.Embedding (PEFT's layout, the reverse of a linear layer's): A = 0, B ~ N(0, 1)
        t["lora_A"], t["lora_B"] = torch.zeros(cfg.r, d_in), torch.randn(d_out, cfg.r)  # (r, i), (o, r)
    return t


def forward(m: nn.Module, x: Tensor, y: Tensor, cfg: Config) -> Tensor:
    """New output of target `m`. x: (..., i) input in the adapter dtype; y: (..., o) base output."""
    s = cfg.alpha / cfg.r
    # an nn.Embedding's x holds token ids (...,): x A^T is a lookup of A's columns (PEFT's lora_embedding_A)
    xa = embedding_lookup(m, x, m.lora_A) if is_embedding(m) else x @ m.lora_A.T  # (..., r)
    delta = (s * xa) @ m.lora_B.T  # (..., o); s scales the (..., r) factor
    with torch.no_grad():  # the norm is a constant for autograd (DoRA sec. 4.3, as PEFT)
        # the adapted weight is the layer's weight plus Bf Af; its squared row norms are
        # ||W_i||^2 + 2 Bf_i . (W Af^T)_i + Bf_i (Af Af^T) Bf_i^T: W is only applied to Af's rows,
        # never copied, so a 4/8-bit W stays quantized (its ||W_i||^2 is cached)
        Bf, Af = m.lora_B.float(), s * m.lora_A.float()  # (o, r), (r, i)
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
    raise ValueError("dora has no frozen part (residual none)")


def shared(cfg: Config, d_in: int, d_out: int) -> dict[str, Tensor]:
    """The SHARED tensors (fp32), built once per adapter and registered on every target as one
    tensor. d_in, d_out: the largest among the adapter's targets; forward() slices each target's part.
    """
    return {}
