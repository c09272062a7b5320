# Code generated from specs/corda_lora.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""CorDA: LoRA initialised on the SVD of W C, C the covariance of the layer inputs (PEFT's CorDA, ipm).

Yang et al. 2024, CorDA: Context-Oriented Decomposition Adaptation of Large Language Models,
arXiv 2406.05223.
Reference implementation: PEFT peft/tuners/lora/corda.py and LoraLayer.corda_init (corda_method="ipm").

Formula (from the composition):

    C = mean_s X_s^T X_s / max(X_s)^2            (X_s: one sequence's tokens, scaled by its largest input, as PEFT)
    C = C + d mean(diag C) I                     (d = cov_eps doubled until |C C^-1 - I| < 0.05, as PEFT)
    U S Vh = SVD(W C),  P = Vh_r C^-1            (fp32, top-r: PEFT's ipm; W = U_r diag(S_r) P + W_res)
    s = alpha / r
    A = sqrt(S / s) P,   B = U sqrt(S / s)     (so s B A = U diag(S) P)
    y = W_res x + s B A x              (residual crop: W_res stored in the layer)
    y = W x - s B0 A0 x + s B A x      (residual subtract: W untouched, e.g. 4/8-bit)

    U S Vh = SVD(W C) with C the damped input covariance; A = sqrt(S / s) Vh C^-1 and
    B = U sqrt(S / s) take the top r directions (ipm: the knowledge of the context to adapt),
    so s B A = U_r diag(S_r) Vh_r C^-1, and W_res = W - s B A stays frozen in the layer.
    select kpm keeps the bottom r instead (knowledge-preserving). C's scale cancels in s B A.

Identity at init: W_res + s B A = W (W_res formed from the stored copies A0, B0).

Calibration data is required (at least d_in non-padding tokens per target). C here is the
mean of x x^T over the non-padding calibration tokens; PEFT's statistic runs batches of one
sequence, each scaled by its signed maximum, without a padding mask, so the two agree up to
a scale (which cancels) on one unpadded sequence and differ otherwise. The damping is PEFT's:
cov_eps times the mean of diag(C), doubled until |C C^-1 - I| < 0.05.

Spec: basis=corda+ipm, core=lowrank, modifiers=[scale alpha_over_r], residual=crop (or subtract:
cfg.residual), hook=output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

NAME = "corda_lora"  # the spec's name
TITLE = "CorDA"  # its title
HOOK = "output"  # forward hook: forward() returns the layer's new output
CAST_INPUT = True  # the hook casts x to cfg.dtype for forward() (an input hook casts the result back)
RESIDUAL = "crop"  # default: while attached the base weight holds W_res = W - frozen_weight()
RESIDUALS = ("crop", "subtract")  # the values cfg.residual may take
CALIBRATION = "required"  # attach raises without calibration data
STATISTICS = ("sequence_second_moment",)  # what init() reads from stats: calibration gathers these
TARGET_NAMES = ("\\.q_proj$", "\\.v_proj$")  # default targets: re.search on module names
LR = 0.0001  # recommended AdamW learning rate
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
    "cov_eps": (1e-12, 1000000.0),
}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """CorDA hyperparameters (defaults from specs/corda_lora.yaml)."""

    r: int = 8  # rank of the update
    alpha: float = 16.0  # scale numerator, s = alpha / r
    cov_eps: float = 0.01  # first damping, relative to the mean of diag(C) (PEFT's 0.01)


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_A": (("r", "d_in"), "basis", True),  # sqrt(S / s) Vh C^-1, trained
    "lora_B": (("d_out", "r"), "basis", True),  # U sqrt(S / s), trained
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
    s = cfg.alpha / cfg.r
    t = {}
    # basis: covariance-oriented SVD on C, a second moment of this layer's calibration inputs (padding excluded)
    if stats is None:
        raise ValueError("CorDA needs calibration data: pass ll.attach(model, cfg, calibration_data=batches)")
    if stats["tokens"] < d_in:
        raise ValueError(f"CorDA needs at least d_in={d_in} calibration tokens, got {stats['tokens']}")
    # PEFT's form (CorDA's paper): SVD of W C, damped by cov_eps * mean(diag C), doubled until the
    # inverse is accurate (PEFT's check); C's scale cancels in U diag(S) Vh C^-1. C is PEFT's
    # statistic: the mean over sequences of X_s^T X_s, each sequence divided by its largest input
    C, eye = stats["sequence_second_moment"], torch.eye(d_in)  # (i, i)
    if not C.diagonal().mean() > 0:
        raise ValueError("CorDA needs non-zero calibration inputs (the covariance is zero)")
    damp = cfg.cov_eps
    C_d = C + eye * (C.diagonal().mean() * damp)  # (i, i)
    C_inv = torch.linalg.inv(C_d)  # (i, i)
    while torch.dist(C_d @ C_inv, eye) >= 0.05:
        damp = damp * 2
        C_d = C + eye * (C.diagonal().mean() * damp)
        C_inv = torch.linalg.inv(C_d)
    U, S, Vh = torch.linalg.svd(W @ C_d, full_matrices=False)  # (o, n), (n,), (n, i); n = min(o, i)
    sign = torch.where(U.gather(0, U.abs().argmax(0, keepdim=True)) < 0, -1.0, 1.0)  # (1, n)
    U, Vh = U * sign, Vh * sign.T  # canonical signs: the largest |entry| of each U column > 0
    U, S, Vh = U[:, : cfg.r], S[: cfg.r], Vh[: cfg.r]  # (o, r), (r,), (r, i)
    P = Vh @ C_inv  # (r, i) oblique input projector, PEFT's V^T: W = U diag(S) P + W_res
    # split S between A and B so that s B A = U diag(S) P (PEFT's PiSSA init)
    t["lora_A"] = torch.sqrt(S / s)[:, None] * P  # (r, i)
    t["lora_B"] = U * torch.sqrt(S / s)  # (o, r)
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
