# Code generated from specs/eva_dora.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""EVA-DoRA: DoRA's learned magnitude per output row on an EVA-initialised LoRA (A on the inputs' principal directions).

Paischer et al. 2024, One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation, arXiv 2410.07170.
Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation, arXiv 2402.09353.
Reference implementation: PEFT peft/tuners/lora (init_lora_weights="eva", use_dora=True; eva.py, dora.py).

Formula (from the composition):

    C = E[(x - mu)(x - mu)^T]    over calibration tokens (padding and labels == -100 excluded)
    P = top-r eigenvectors of C as rows (r, d_in)
    s = alpha / r
    A = P,   B = 0
    y = W x + s B A x
    y <- m / ||W'||_row * (y - b) + b    (DoRA: W' the adapted weight, m (d_out,), the norm detached)

Identity at init: B = 0 and m = ||W||_row, so the update is zero and the scale 1.

Calibration data is required, as for eva (more than r tokens per target; uniform rank, PEFT's
rho=1; the exact eigenvectors of the pooled covariance where PEFT runs an incremental
randomized PCA). The norm is that of W + s B A, expanded as in dora, so W is never copied;
the forward reads W, so a checkpoint refuses a base whose weights differ.

Spec: basis=pca, core=lowrank, modifiers=[scale alpha_over_r, magnitude], residual=none,
hook=output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

# the layer's own reads: W through its forward (float or 4/8-bit), an nn.Embedding's token lookup
from lora_lite.runtime import base_forward, base_row_sqnorm

NAME = "eva_dora"  # the spec's name
TITLE = "EVA-DoRA"  # its title
HOOK = "output"  # forward hook: forward() returns the layer's new output
CAST_INPUT = True  # the hook casts x to cfg.dtype for forward() (an input hook casts the result back)
RESIDUAL = "none"  # the base weight is never modified
RESIDUALS = ("none",)  # the values cfg.residual may take
CALIBRATION = "required"  # attach raises without calibration data
STATISTICS = ("second_moment",)  # what init() reads from stats: calibration gathers these
TARGET_NAMES = ("\\.q_proj$", "\\.v_proj$")  # default targets: re.search on module names
LR = 0.0001  # recommended AdamW learning rate
QUANTIZED_BASE = True  # bitsandbytes 4/8-bit targets work (with residual subtract where W is cropped)
USES_BASE_WEIGHT = True  # the math reads W: load refuses a base whose weights differ
PER_RANK = {"alpha": 1.0}  # read over r ** e: clamping r to r_c scales it by (r_c / r) ** e
EMBEDDING = False  # attach refuses nn.Embedding targets
SHARED = ()  # tensors kept once per adapter for every target (frozen; see shared())
RUNTIME_KNOBS = ()  # hyperparameters that may change after attach
RANKS = ("r",)  # hyperparameters clamped per target to min(d_in, d_out)
BOUNDS = {"r": (1, 65536), "alpha": (-1000000.0, 1000000.0)}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """EVA-DoRA hyperparameters (defaults from specs/eva_dora.yaml)."""

    r: int = 8  # rank of the update
    alpha: float = 16.0  # scale numerator, s = alpha / r


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_A": (("r", "d_in"), "basis", True),  # top-r principal directions of the inputs
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
def init(W: Tensor, cfg: Config, stats: dict | None = None) -> dict[str, Tensor]:
    """Initial adapter tensors (fp32) for one target. W: (o, i) base weight, fp32, dequantized.

    `stats` holds statistics of this layer's input, gathered on the intact model, when
    calibration data was given: "second_moment" (i, i) = mean of x x^T and "mean" (i,) = mean
    of x over the counted tokens (padding and labels == -100 excluded), and "tokens", their
    count. Otherwise it is None.
    """
    d_out, d_in = W.shape
    t = {}
    t["lora_B"] = torch.zeros(d_out, cfg.r)  # (o, r)
    # basis: top-r principal directions of this layer's inputs, as PEFT's EVA (its incremental
    # PCA centres the data): eigenvectors of the covariance C = E[x x^T] - mu mu^T, in fp64,
    # largest variance first; signs canonical (largest |entry| of each direction > 0, as PEFT)
    if stats is None:
        raise ValueError("basis 'pca' needs calibration data: pass ll.attach(model, cfg, calibration_data=batches)")
    if stats["tokens"] <= cfg.r:
        raise ValueError(
            f"basis 'pca' needs more than r={cfg.r} calibration tokens (centring uses one), "
            f"got {stats['tokens']}; pass more or longer batches"
        )
    mu = stats["mean"].double()  # (i,)
    C = stats["second_moment"].double() - torch.outer(mu, mu)  # (i, i)
    _, evecs = torch.linalg.eigh(C)  # (i, i), columns by ascending eigenvalue
    P = evecs.flip(1)[:, : cfg.r].T  # (r, i)
    sign = torch.where(P.gather(1, P.abs().argmax(1, keepdim=True)) < 0, -1.0, 1.0)  # (r, 1)
    P = (P * sign).float()  # (r, i)
    # A = the principal directions (PEFT's EVA with whiten=False); B = 0 keeps the start exact
    t["lora_A"] = P  # (r, i)
    # magnitude m = ||W||_row, the row norms of the adapted weight at init (the core starts at the identity)
    t["lora_magnitude_vector"] = torch.linalg.vector_norm(W, dim=1)  # (o,)
    return t


def forward(m: nn.Module, x: Tensor, y: Tensor, cfg: Config) -> Tensor:
    """New output of target `m`. x: (..., i) input in the adapter dtype; y: (..., o) base output."""
    s = cfg.alpha / cfg.r
    delta = (s * (x @ m.lora_A.T)) @ m.lora_B.T  # (..., o); s scales the (..., r) factor
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
    raise ValueError("eva_dora has no frozen part (residual none)")


def shared(cfg: Config, d_in: int, d_out: int) -> dict[str, Tensor]:
    """The SHARED tensors (fp32), built once per adapter and registered on every target as one
    tensor. d_in, d_out: the largest among the adapter's targets; forward() slices each target's part.
    """
    return {}
