# Code generated from specs/antipasto.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""AntiPaSTO: W's own top-r singular directions, frozen; only a bounded positive gain on each is learned.

wassname 2026, AntiPaSTO (upstream lora-lite, src/lora_lite/variants/antipasto.py).
Sun et al. 2023, A Simple and Effective Pruning Approach for Large Language Models (Wanda),
arXiv 2306.11695.
Reference implementation: wassname/lora-lite src/lora_lite/variants/antipasto.py (no PEFT equivalent).

Formula (from the composition):

    W = U diag(S) Vh + W_res    (Wanda-selected r singular directions of W, fp32)
        with calibration data the r directions are re-selected among all min(d_in, d_out) by
        S_k * rms(X Vh_k^T) = S_k * sqrt(Vh_k C Vh_k^T), C = E[x x^T], and kept in S order
    S_eff = S * (1 + ELU(coeff * g))             (g <= 0 when suppress_only)
    h = (x Vh^T) * S_eff
    y = x W_res^T + h U^T        (residual crop: W_res stored in the layer)
    y = x W^T + (h - h0) U^T     (residual subtract, h0 = (x Vh^T) * S: W untouched)

Identity at init: g = 0 (or coeff = 0) gives S_eff = S, and W_res is formed from
the stored (rounded) U, S, Vh, so W_res + U diag(S) Vh = W in any adapter dtype.
With residual subtract the added change is exactly 0, whatever the dtype.

1 + ELU(t) is positive and sign-preserving: attenuation saturates towards 0 (t -> -inf),
amplification grows linearly (t > 0). The basis never moves, so each learned g_k reads as
the gain on one singular direction of W. coeff is a runtime knob (ll.set_coeff): 0 turns the
adapter off, -1 inverts a learned steer. With suppress_only a g pushed above 0 gets no
gradient (it acts as 0, as a projected step would leave it).

Spec: basis=svd+wanda, core=gain, modifiers=[], residual=crop (or subtract: cfg.residual),
hook=output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

NAME = "antipasto"  # the spec's name
TITLE = "AntiPaSTO"  # its title
HOOK = "output"  # forward hook: forward() returns the layer's new output
CAST_INPUT = True  # the hook casts x to cfg.dtype for forward() (an input hook casts the result back)
RESIDUAL = "crop"  # default: while attached the base weight holds W_res = W - frozen_weight()
RESIDUALS = ("crop", "subtract")  # the values cfg.residual may take
CALIBRATION = "optional"  # calibration data refines the basis when given
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
}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """AntiPaSTO hyperparameters (defaults from specs/antipasto.yaml)."""

    r: int = 256  # number of frozen singular directions
    coeff: float = 1.0  # runtime scale of the learned gain, 0 = identity
    suppress_only: bool = False  # clamp g <= 0, so directions can only be attenuated


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_g": (("r",), "zeros", True),  # gain logits, S_eff = S * (1 + ELU(coeff * g))
    "lora_U": (("d_out", "r"), "basis", False),  # frozen output singular vectors
    "lora_S": (("r",), "basis", False),  # frozen singular values
    "lora_Vh": (("r", "d_in"), "basis", False),  # frozen input singular vectors
}


def shapes(cfg: Config, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor for a target whose weight is (d_out, d_in)."""
    return {
        "lora_g": (cfg.r,),
        "lora_U": (d_out, cfg.r),
        "lora_S": (cfg.r,),
        "lora_Vh": (cfg.r, d_in),
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
    # basis: SVD of W in fp32; signs made canonical (largest |entry| of each U column > 0)
    # so the result does not depend on the LAPACK build
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (o, n), (n,), (n, i); n = min(o, i)
    sign = torch.where(U.gather(0, U.abs().argmax(0, keepdim=True)) < 0, -1.0, 1.0)  # (1, n)
    U, Vh = U * sign, Vh * sign.T
    if stats is None:
        keep = torch.arange(cfg.r)  # (r,) no calibration data: the top-r by S
    else:
        # Wanda re-selection: score_k = S_k * rms(X Vh_k^T) = S_k * sqrt(Vh_k C Vh_k^T), C = E[x x^T]
        if stats["tokens"] < cfg.r:
            raise ValueError(f"Wanda selection needs at least r={cfg.r} calibration tokens, got {stats['tokens']}")
        rms = ((Vh @ stats["second_moment"]) * Vh).sum(1).clamp_min(0.0).sqrt()  # (n,)
        keep = (S * rms).topk(cfg.r).indices.sort().values  # (r,) best r by score, kept in S order
    U, S, Vh = U[:, keep], S[keep], Vh[keep]  # (o, r), (r,), (r, i)
    # frozen basis; crop removes it from W using these values as stored (adapter dtype)
    t["lora_U"], t["lora_S"], t["lora_Vh"] = U, S, Vh  # (o, r), (r,), (r, i)
    return t


def forward(m: nn.Module, x: Tensor, y: Tensor, cfg: Config) -> Tensor:
    """New output of target `m`. x: (..., i) input in the adapter dtype; y: (..., o) base output."""
    g = m.lora_g.clamp(max=0.0) if cfg.suppress_only else m.lora_g  # (r,)
    S_eff = m.lora_S * (1.0 + nn.functional.elu(cfg.coeff * g))  # (r,) positive, sign-preserving gain
    # crop: y = x W_res^T (+ bias) lacks the top-r part, add U S_eff Vh x back;
    # subtract: y = x W^T (+ bias) is whole, add only the change U (S_eff - S) Vh x (0 at init)
    gain = S_eff - m.lora_S if cfg.residual == "subtract" else S_eff  # (r,)
    h = (x @ m.lora_Vh.T) * gain  # (..., r)
    delta = h @ m.lora_U.T  # (..., o)
    return y + delta.to(y.dtype)  # (..., o)


def frozen_weight(m: nn.Module, cfg: Config) -> Tensor:
    """The part of W this adapter takes over, (o, i) fp32, from the stored (rounded) buffers.

    residual crop: attach and load crop the base weight to W_res = W - frozen_weight(); detach
    adds it back. residual subtract: W is never modified; forward() takes this part out of the
    output in factored form, without forming the (o, i) matrix. Raises ValueError without one.
    """
    return (m.lora_U.float() * m.lora_S.float()) @ m.lora_Vh.float()  # (o, i)


def shared(cfg: Config, d_in: int, d_out: int) -> dict[str, Tensor]:
    """The SHARED tensors (fp32), built once per adapter and registered on every target as one
    tensor. d_in, d_out: the largest among the adapter's targets; forward() slices each target's part.
    """
    return {}
