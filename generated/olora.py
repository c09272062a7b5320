# Code generated from specs/olora.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""OLoRA: LoRA initialised on an orthonormal basis of W from its QR decomposition, with W cropped to the rest.

Büyükakyüz 2024, OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models, arXiv
2406.01775.
Reference implementation: PEFT peft/tuners/lora/layer.py, LoraLayer.olora_init.

Formula (from the composition):

    W = Q_r R_r + W_res    (W = Q R, thin QR of W in fp32; Q_r (o, r) orthonormal, R_r (r, i))
    s = alpha / r
    A = R_r,   B = Q_r,   W_res = W - s B A
    y = W_res x + s B A x              (residual crop: W_res stored in the layer)
    y = W x - s B0 A0 x + s B A x      (residual subtract: W untouched, e.g. 4/8-bit)

Identity at init: W_res + s B A = W, with W_res formed from the stored (rounded) copies A0 and B0.
With residual subtract the added change is exactly 0, whatever the dtype.

A and B are R and Q as LAPACK returns them (no sign canonicalisation, as PEFT), so the same
weights on another LAPACK build may start from a basis with flipped signs; s B A is the same.

Spec: basis=qr, core=lowrank, modifiers=[scale alpha_over_r], residual=crop (or subtract:
cfg.residual), hook=output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

NAME = "olora"  # the spec's name
TITLE = "OLoRA"  # its title
HOOK = "output"  # forward hook: forward() returns the layer's new output
CAST_INPUT = True  # the hook casts x to cfg.dtype for forward() (an input hook casts the result back)
RESIDUAL = "crop"  # default: while attached the base weight holds W_res = W - frozen_weight()
RESIDUALS = ("crop", "subtract")  # the values cfg.residual may take
CALIBRATION = "none"  # calibration data is accepted and ignored
STATISTICS = ()  # what init() reads from stats: calibration gathers these
TARGET_NAMES = ("\\.q_proj$", "\\.v_proj$")  # default targets: re.search on module names
LR = 0.0001  # recommended AdamW learning rate
QUANTIZED_BASE = True  # bitsandbytes 4/8-bit targets work (with residual subtract where W is cropped)
USES_BASE_WEIGHT = False  # the math never reads W after init
PER_RANK = {"alpha": 1.0}  # read over r ** e: clamping r to r_c scales it by (r_c / r) ** e
EMBEDDING = False  # attach refuses nn.Embedding targets
SHARED = ()  # tensors kept once per adapter for every target (frozen; see shared())
RUNTIME_KNOBS = ()  # hyperparameters that may change after attach
RANKS = ("r",)  # hyperparameters clamped per target to min(d_in, d_out)
BOUNDS = {"r": (1, 65536), "alpha": (-1000000.0, 1000000.0)}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """OLoRA hyperparameters (defaults from specs/olora.yaml)."""

    r: int = 8  # rank of the update
    alpha: float = 16.0  # scale numerator, s = alpha / r


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_A": (("r", "d_in"), "basis", True),  # R_r, the first r rows of R (trained)
    "lora_B": (("d_out", "r"), "basis", True),  # Q_r, the first r columns of Q (trained)
    "lora_A0": (("r", "d_in"), "basis", False),  # frozen copy of A at init
    "lora_B0": (("d_out", "r"), "basis", False),  # frozen copy of B at init
}


def shapes(cfg: Config, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor for a target whose weight is (d_out, d_in)."""
    return {
        "lora_A": (cfg.r, d_in),
        "lora_B": (d_out, cfg.r),
        "lora_A0": (cfg.r, d_in),
        "lora_B0": (d_out, cfg.r),
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
    # basis: thin QR of W in fp32 (OLoRA, as PEFT: Q and R as LAPACK returns them)
    Q, R = torch.linalg.qr(W)  # (o, n), (n, i); n = min(o, i)
    Q, R = Q[:, : cfg.r], R[: cfg.r]  # (o, r), (r, i)
    t["lora_A"], t["lora_B"] = R, Q  # (r, i), (o, r) as PEFT's OLoRA: s B A = s Q_r R_r is cropped
    t["lora_A0"] = t["lora_A"].clone()  # frozen copies: the part of W that crop removes
    t["lora_B0"] = t["lora_B"].clone()
    return t


def forward(m: nn.Module, x: Tensor, y: Tensor, cfg: Config) -> Tensor:
    """New output of target `m`. x: (..., i) input in the adapter dtype; y: (..., o) base output."""
    s = cfg.alpha / cfg.r
    delta = (s * (x @ m.lora_A.T)) @ m.lora_B.T  # (..., o); s scales the (..., r) factor
    # crop: y = x W_res^T (+ bias) lacks s B0 A0, the trained s B A x replaces it;
    # subtract: y = x W^T (+ bias) is whole, take s B0 A0 x out here (0 change at init: A, B = A0, B0)
    if cfg.residual == "subtract":
        delta = delta - (s * (x @ m.lora_A0.T)) @ m.lora_B0.T  # (..., o)
    return y + delta.to(y.dtype)  # (..., o)


def frozen_weight(m: nn.Module, cfg: Config) -> Tensor:
    """The part of W this adapter takes over, (o, i) fp32, from the stored (rounded) buffers.

    residual crop: attach and load crop the base weight to W_res = W - frozen_weight(); detach
    adds it back. residual subtract: W is never modified; forward() takes this part out of the
    output in factored form, without forming the (o, i) matrix. Raises ValueError without one.
    """
    s = cfg.alpha / cfg.r
    return s * (m.lora_B0.float() @ m.lora_A0.float())  # (o, i)


def shared(cfg: Config, d_in: int, d_out: int) -> dict[str, Tensor]:
    """The SHARED tensors (fp32), built once per adapter and registered on every target as one
    tensor. d_in, d_out: the largest among the adapter's targets; forward() slices each target's part.
    """
    return {}
