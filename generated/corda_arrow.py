# Code generated from specs/corda_arrow.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""CorDA-arrow: the arrow core (dense top-b block plus gain) on the covariance-oriented CorDA basis.

wassname 2026, AntiPaSTO (upstream lora-lite, antipasto_arrow.py and antipasto_corda.py).
Yang et al. 2024, CorDA: Context-Oriented Decomposition Adaptation of Large Language Models,
arXiv 2406.05223.
Reference implementation: none (basis of specs/antipasto_corda.yaml, core of specs/antipasto_arrow.yaml).

Formula (from the composition):

    C = E[x x^T] + cov_eps I                     (non-padding calibration tokens; eps on eigenvalues)
    U S Vh = SVD(W C^1/2),  P = Vh_r C^-1/2      (fp32; W = U_r diag(S_r) P + W_res)
    h = (x P^T) * S                             (..., r) S-scaled coordinates, largest S first
    h[:b] <- h[:b] (I + coeff * M)^T             (b, b) dense block on the top-b directions
    h[b:] <- h[b:] * (1 + ELU(coeff * g))        (r - b,) bounded gain on the rest
    y = x W_res^T + h U^T        (residual crop: W_res stored in the layer)
    y = x W^T + (h - h0) U^T     (residual subtract, h0 = (x P^T) * S: W untouched)

Identity at init: M = 0 and g = 0 (or coeff = 0) make the core I, and W_res is
formed from the stored (rounded) U, S, P, so W_res + U diag(S) P = W.
With residual subtract the added change is exactly 0, whatever the dtype.

No upstream file has this combination: it is specs/antipasto_arrow.yaml with basis
corda, to show a new variant is a spec edit. The block mixes the directions that carry the
most output energy on the calibration inputs rather than on isotropic ones. Needs
calibration data (at least d_in tokens per target) and 1 <= block < r.

Spec: basis=corda+whitened, core=arrow, modifiers=[], residual=crop (or subtract: cfg.residual),
hook=output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

NAME = "corda_arrow"  # the spec's name
TITLE = "CorDA-arrow"  # its title
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
    "block": (1, 65536),
    "coeff": (-1000.0, 1000.0),
    "suppress_only": (None, None),
    "cov_eps": (0.0, 1000000.0),
}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """CorDA-arrow hyperparameters (defaults from specs/corda_arrow.yaml)."""

    r: int = 256  # number of frozen covariance-oriented directions
    block: int = 8  # size b of the dense block on the top-b directions (b < r)
    coeff: float = 1.0  # runtime scale of block and gain, 0 = identity
    suppress_only: bool = False  # clamp the tail's g <= 0 (the block is unaffected)
    cov_eps: float = 0.001  # damping added to the eigenvalues of C (absolute, as upstream)


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_M": (("block", "block"), "zeros", True),  # block B = I + coeff * M on the top-b directions
    "lora_g": (("r - block",), "zeros", True),  # gain logits on the other r - b directions
    "lora_U": (("d_out", "r"), "basis", False),  # frozen output singular vectors of W C^1/2
    "lora_S": (("r",), "basis", False),  # frozen singular values of W C^1/2
    "lora_P": (("r", "d_in"), "basis", False),  # frozen oblique input projector Vh C^-1/2
}


def shapes(cfg: Config, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor for a target whose weight is (d_out, d_in)."""
    return {
        "lora_M": (cfg.block, cfg.block),
        "lora_g": (cfg.r - cfg.block,),
        "lora_U": (d_out, cfg.r),
        "lora_S": (cfg.r,),
        "lora_P": (cfg.r, d_in),
    }


def check(cfg: Config, d_in: int, d_out: int) -> None:
    """Raise ValueError (one line) when a layer whose weight is (d_out, d_in) cannot take `cfg`.

    init() calls it at attach; load calls it before reading a target's tensors, so a checkpoint
    whose shapes fit but whose hyperparameters do not fit the layer is refused, not run.
    """
    if not 1 <= cfg.block < cfg.r:
        raise ValueError(f"arrow needs 1 <= block < r, got block={cfg.block}, r={cfg.r} (lower block)")


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
    t["lora_M"] = torch.zeros(cfg.block, cfg.block)  # (block, block)
    t["lora_g"] = torch.zeros(cfg.r - cfg.block)  # (r - block,)
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
    b = cfg.block
    h0 = (x @ m.lora_P.T) * m.lora_S  # (..., r) S-scaled coordinates
    g = m.lora_g.clamp(max=0.0) if cfg.suppress_only else m.lora_g  # (r - b,)
    # the change the core makes, core - I: coeff M on the top-b directions, ELU(coeff g) on the rest
    d_top = h0[..., :b] @ (cfg.coeff * m.lora_M).T  # (..., b) dense block mixes the top-b directions
    d_tail = h0[..., b:] * nn.functional.elu(cfg.coeff * g)  # (..., r - b) gain on the rest
    d = torch.cat([d_top, d_tail], dim=-1)  # (..., r)
    # crop: y = x W_res^T (+ bias) lacks the top-r part, add (h0 + d) U^T;
    # subtract: y = x W^T (+ bias) is whole, add only the change d U^T (0 at init: M = 0, g = 0)
    h = d if cfg.residual == "subtract" else h0 + d  # (..., r)
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
