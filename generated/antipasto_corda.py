# Code generated from specs/antipasto_corda.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""AntiPaSTO-CorDA: AntiPaSTO's gain on a basis oriented by the input second moment (whitened CorDA form).

wassname 2026, AntiPaSTO (upstream lora-lite, src/lora_lite/variants/antipasto_corda.py).
Yang et al. 2024, CorDA: Context-Oriented Decomposition Adaptation of Large Language Models,
arXiv 2406.05223.
Reference implementation: wassname/lora-lite src/lora_lite/variants/antipasto_corda.py (PEFT has the W C form).

Formula (from the composition):

    C = E[x x^T] + cov_eps I                     (non-padding calibration tokens; eps on eigenvalues)
    U S Vh = SVD(W C^1/2),  P = Vh_r C^-1/2      (fp32; W = U_r diag(S_r) P + W_res)
    S_eff = S * (1 + ELU(coeff * g))             (g <= 0 when suppress_only)
    h = (x P^T) * S_eff
    y = x W_res^T + h U^T        (residual crop: W_res stored in the layer)
    y = x W^T + (h - h0) U^T     (residual subtract, h0 = (x P^T) * S: W untouched)

Identity at init: g = 0 (or coeff = 0) gives S_eff = S, and W_res is formed from
the stored (rounded) U, S, P, so W_res + U diag(S) P = W in any adapter dtype.
With residual subtract the added change is exactly 0, whatever the dtype.

This is upstream lora-lite's whitened form. CorDA's paper and PEFT decompose W C instead and
keep P = Vh C^-1; both orient the top-r directions by where the inputs have energy, but the
singular values differ (here S_k is the gain under inputs whitened by C). Only P is stored
(no separate Vh), so P has non-orthonormal rows; U stays orthonormal. cov_eps is absolute,
as upstream: it assumes activations of order 1 (raise it for larger ones). Needs at least
d_in non-padding calibration tokens per target, so C is full rank before damping.

Spec: basis=corda+whitened, core=gain, modifiers=[], residual=crop (or subtract: cfg.residual),
hook=output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

NAME = "antipasto_corda"  # the spec's name
TITLE = "AntiPaSTO-CorDA"  # its title
HOOK = "output"  # forward hook: forward() returns the layer's new output
CAST_INPUT = True  # the hook casts x to cfg.dtype for forward() (an input hook casts the result back)
RESIDUAL = "crop"  # default: while attached the base weight holds W_res = W - frozen_weight()
RESIDUALS = ("crop", "subtract")  # the values cfg.residual may take
CALIBRATION = "required"  # attach raises without calibration data
STATISTICS = ("second_moment",)  # what init() reads from stats: calibration gathers these
TARGET_NAMES = ("\\.q_proj$", "\\.v_proj$")  # default targets: re.search on module names
LR = 0.005  # recommended AdamW learning rate
QUANTIZED_BASE = True  # bitsandbytes 4/8-bit targets work (with residual subtract where W is cropped)
USES_BASE_WEIGHT = False  # the math never reads W after init
PER_RANK = {}  # read over r ** e: clamping r to r_c scales it by (r_c / r) ** e
EMBEDDING = False  # attach refuses nn.Embedding targets
SHARED = ()  # tensors kept once per adapter for every target (frozen; see shared())
RUNTIME_KNOBS = ("coeff",)  # hyperparameters that may change after attach
RANKS = ("r",)  # hyperparameters clamped per target to min(d_in, d_out)
BOUNDS = {
    "r": (1, 65536),
    "coeff": (-1000.0, 1000.0),
    "suppress_only": (None, None),
    "cov_eps": (0.0, 1000000.0),
}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """AntiPaSTO-CorDA hyperparameters (defaults from specs/antipasto_corda.yaml)."""

    r: int = 256  # number of frozen covariance-oriented directions
    coeff: float = 1.0  # runtime scale of the learned gain, 0 = identity
    suppress_only: bool = False  # clamp g <= 0, so directions can only be attenuated
    cov_eps: float = 0.001  # damping added to the eigenvalues of C (absolute, as upstream)


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_g": (("r",), "zeros", True),  # gain logits, S_eff = S * (1 + ELU(coeff * g))
    "lora_U": (("d_out", "r"), "basis", False),  # frozen output singular vectors of W C^1/2
    "lora_S": (("r",), "basis", False),  # frozen singular values of W C^1/2
    "lora_P": (("r", "d_in"), "basis", False),  # frozen oblique input projector Vh C^-1/2
}


def shapes(cfg: Config, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor for a target whose weight is (d_out, d_in)."""
    return {
        "lora_g": (cfg.r,),
        "lora_U": (d_out, cfg.r),
        "lora_S": (cfg.r,),
        "lora_P": (cfg.r, d_in),
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
    t["lora_g"] = torch.zeros(cfg.r)  # (r,)
    # basis: covariance-oriented SVD on C, a second moment of this layer's calibration inputs (padding excluded)
    if stats is None:
        raise ValueError("CorDA needs calibration data: pass ll.attach(model, cfg, calibration_data=batches)")
    if stats["tokens"] < d_in:
        raise ValueError(f"CorDA needs at least d_in={d_in} calibration tokens, got {stats['tokens']}")
    # upstream lora-lite's whitened form, damped by cov_eps on C's eigenvalues
    lam, Q = torch.linalg.eigh(stats["second_moment"])  # (i,), (i, i); C = Q diag(lam) Q^T
    lam = lam.clamp_min(0.0) + cfg.cov_eps  # damped eigenvalues, so C^-1/2 stays bounded
    C_half = (Q * lam.sqrt()) @ Q.T  # (i, i) C^1/2
    C_inv_half = (Q * lam.rsqrt()) @ Q.T  # (i, i) C^-1/2
    U, S, Vh = torch.linalg.svd(W @ C_half, full_matrices=False)  # (o, n), (n,), (n, i); n = min(o, i)
    sign = torch.where(U.gather(0, U.abs().argmax(0, keepdim=True)) < 0, -1.0, 1.0)  # (1, n)
    U, Vh = U * sign, Vh * sign.T  # canonical signs: the largest |entry| of each U column > 0
    U, S, Vh = U[:, : cfg.r], S[: cfg.r], Vh[: cfg.r]  # (o, r), (r,), (r, i)
    P = Vh @ C_inv_half  # (r, i) oblique input projector: W = U diag(S) P + W_res
    # frozen basis; crop removes it from W using these values as stored (adapter dtype)
    t["lora_U"], t["lora_S"], t["lora_P"] = U, S, P  # (o, r), (r,), (r, i)
    return t


def forward(m: nn.Module, x: Tensor, y: Tensor, cfg: Config) -> Tensor:
    """New output of target `m`. x: (..., i) input in the adapter dtype; y: (..., o) base output."""
    g = m.lora_g.clamp(max=0.0) if cfg.suppress_only else m.lora_g  # (r,)
    S_eff = m.lora_S * (1.0 + nn.functional.elu(cfg.coeff * g))  # (r,) positive, sign-preserving gain
    # crop: y = x W_res^T (+ bias) lacks the top-r part, add U S_eff P x back;
    # subtract: y = x W^T (+ bias) is whole, add only the change U (S_eff - S) P x (0 at init)
    gain = S_eff - m.lora_S if cfg.residual == "subtract" else S_eff  # (r,)
    h = (x @ m.lora_P.T) * gain  # (..., r)
    delta = h @ m.lora_U.T  # (..., o)
    return y + delta.to(y.dtype)  # (..., o)


def frozen_weight(m: nn.Module, cfg: Config) -> Tensor:
    """The part of W this adapter takes over, (o, i) fp32, from the stored (rounded) buffers.

    residual crop: attach and load crop the base weight to W_res = W - frozen_weight(); detach
    adds it back. residual subtract: W is never modified; forward() takes this part out of the
    output in factored form, without forming the (o, i) matrix. Raises ValueError without one.
    """
    return (m.lora_U.float() * m.lora_S.float()) @ m.lora_P.float()  # (o, i)


def shared(cfg: Config, d_in: int, d_out: int) -> dict[str, Tensor]:
    """The SHARED tensors (fp32), built once per adapter and registered on every target as one
    tensor. d_in, d_out: the largest among the adapter's targets; forward() slices each target's part.
    """
    return {}
