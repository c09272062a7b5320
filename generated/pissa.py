# Code generated from specs/pissa.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""PiSSA: LoRA initialised on the top-r singular directions of W, with W cropped to the rest.

Meng et al. 2024, PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
Language Models, arXiv 2404.02948.
Reference implementation: PEFT peft/tuners/lora/layer.py, LoraLayer.pissa_init.

Formula (from the composition):

    W = U diag(S) Vh + W_res    (top-r singular directions of W, fp32)
        svd_niter > 0: randomized SVD instead (torch.svd_lowrank, q = r columns, svd_niter subspace
        iterations; PEFT's init_lora_weights="pissa_niter_[svd_niter]"), approximate, from the global RNG
    s = alpha / r
    A = sqrt(S / s) Vh,   B = U sqrt(S / s)     (so s B A = U diag(S) Vh)
    y = W_res x + s B A x              (residual crop: W_res stored in the layer)
    y = W x - s B0 A0 x + s B A x      (residual subtract: W untouched, e.g. 4/8-bit)

Identity at init: W_res + s B A = W, with W_res formed from the stored (rounded) copies A0 and B0.
With residual subtract the added change is exactly 0, whatever the dtype.

Spec: basis=svd+top, core=lowrank, modifiers=[scale alpha_over_r], residual=crop (or subtract:
cfg.residual), hook=output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

NAME = "pissa"  # the spec's name
TITLE = "PiSSA"  # its title
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
BOUNDS = {
    "r": (1, 65536),
    "alpha": (-1000000.0, 1000000.0),
    "svd_niter": (0, 64),
}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """PiSSA hyperparameters (defaults from specs/pissa.yaml)."""

    r: int = 8  # rank of the update
    alpha: float = 16.0  # scale numerator, s = alpha / r
    svd_niter: int = 0  # 0: exact SVD; k > 0: randomized, k iterations (PEFT pissa_niter_k)


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_A": (("r", "d_in"), "basis", True),  # sqrt(S / s) Vh, trained
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
    # basis: SVD of W in fp32; signs made canonical (largest |entry| of each U column > 0)
    # so the result does not depend on the LAPACK build
    if cfg.svd_niter:  # randomized (Halko et al. 2011, arXiv 0909.4061): only the top r, q = r as PEFT
        U, S, V = torch.svd_lowrank(W, q=cfg.r, niter=cfg.svd_niter)  # (o, r), (r,), (i, r)
        Vh = V.T  # (r, i)
    else:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (o, n), (n,), (n, i); n = min(o, i)
    sign = torch.where(U.gather(0, U.abs().argmax(0, keepdim=True)) < 0, -1.0, 1.0)  # (1, n)
    U, Vh = U * sign, Vh * sign.T
    U, S, Vh = U[:, : cfg.r], S[: cfg.r], Vh[: cfg.r]  # (o, r), (r,), (r, i) the top-r
    # split S between A and B so that s B A = U diag(S) Vh (PEFT's PiSSA init)
    t["lora_A"] = torch.sqrt(S / s)[:, None] * Vh  # (r, i)
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
