# Code generated from specs/antipasto_ablate.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""AntiPaSTO-ablate: W's top-r SVD frozen; k learned directions in its S-scaled output space are partly ablated.

wassname 2026, AntiPaSTO (upstream lora-lite, src/lora_lite/variants/antipasto_ablate.py).
Arditi et al. 2024, Refusal in Language Models Is Mediated by a Single Direction, arXiv
2406.11717.
Reference implementation: wassname/lora-lite src/lora_lite/variants/antipasto_ablate.py (no PEFT equivalent).

Formula (from the composition):

    W = U diag(S) Vh + W_res    (top-r singular directions of W, fp32)
    h = (x Vh^T) * S                             (..., r) S-scaled coordinates
    Chat = orthonormal columns of c (QR)         (r, k)
    strength = sigmoid(strength_logit)           (k,) in (0, 1)
    h <- h - coeff * ((h Chat) * strength) Chat^T
    y = x W_res^T + h U^T        (residual crop: W_res stored in the layer)
    y = x W^T + (h - h0) U^T     (residual subtract, h0 = (x Vh^T) * S: W untouched)

Identity at init: only with coeff = 0. strength starts at sigmoid(-2.944) = 0.05,
not 0 (upstream also starts at 0.05), so that c gets a gradient at step 0; this removes 5%
of h along one random direction of the S-scaled space.

The core I - coeff Chat diag(strength) Chat^T has eigenvalues 1 - coeff * strength_j along
Chat and 1 elsewhere: for 0 <= coeff <= 1 it is a contraction (it cannot amplify anything),
the trainable form of directional ablation. coeff < 0 adds the directions back and can grow.
Upstream clamps strength to [0, 1]; the sigmoid here is smooth and never stuck at a bound.
c starts uniform in +-1/sqrt(k) per entry (random directions; only its span matters).

Spec: basis=svd+top, core=ablate, modifiers=[], residual=crop (or subtract: cfg.residual),
hook=output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

NAME = "antipasto_ablate"  # the spec's name
TITLE = "AntiPaSTO-ablate"  # its title
HOOK = "output"  # forward hook: forward() returns the layer's new output
CAST_INPUT = True  # the hook casts x to cfg.dtype for forward() (an input hook casts the result back)
RESIDUAL = "crop"  # default: while attached the base weight holds W_res = W - frozen_weight()
RESIDUALS = ("crop", "subtract")  # the values cfg.residual may take
CALIBRATION = "none"  # calibration data is accepted and ignored
STATISTICS = ()  # what init() reads from stats: calibration gathers these
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
    "k": (1, 65536),
    "coeff": (-1000.0, 1000.0),
}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """AntiPaSTO-ablate hyperparameters (defaults from specs/antipasto_ablate.yaml)."""

    r: int = 256  # number of frozen singular directions
    k: int = 1  # number of ablation directions (k <= r)
    coeff: float = 1.0  # runtime scale of the ablation, 0 = identity, (0, 1] contracts


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_c": (("r", "k"), "kaiming_uniform", True),  # ablation directions in S-space (orthonormalised in forward)
    "lora_strength_logit": (("k",), "constant", True),  # strength = sigmoid(logit), 0.05 at init
    "lora_U": (("d_out", "r"), "basis", False),  # frozen output singular vectors
    "lora_S": (("r",), "basis", False),  # frozen singular values
    "lora_Vh": (("r", "d_in"), "basis", False),  # frozen input singular vectors
}


def shapes(cfg: Config, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor for a target whose weight is (d_out, d_in)."""
    return {
        "lora_c": (cfg.r, cfg.k),
        "lora_strength_logit": (cfg.k,),
        "lora_U": (d_out, cfg.r),
        "lora_S": (cfg.r,),
        "lora_Vh": (cfg.r, d_in),
    }


def check(cfg: Config, d_in: int, d_out: int) -> None:
    """Raise ValueError (one line) when a layer whose weight is (d_out, d_in) cannot take `cfg`.

    init() calls it at attach; load calls it before reading a target's tensors, so a checkpoint
    whose shapes fit but whose hyperparameters do not fit the layer is refused, not run.
    """
    if cfg.k > cfg.r:
        raise ValueError(f"ablate needs k <= r directions, got k={cfg.k}, r={cfg.r} (lower k)")


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
    t["lora_c"] = torch.empty(cfg.r, cfg.k)  # (r, k)
    nn.init.kaiming_uniform_(t["lora_c"], a=math.sqrt(5))  # as nn.Linear (PEFT's lora_A init)
    t["lora_strength_logit"] = torch.full((cfg.k,), -2.944439)  # (k,)
    # basis: SVD of W in fp32; signs made canonical (largest |entry| of each U column > 0)
    # so the result does not depend on the LAPACK build
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (o, n), (n,), (n, i); n = min(o, i)
    sign = torch.where(U.gather(0, U.abs().argmax(0, keepdim=True)) < 0, -1.0, 1.0)  # (1, n)
    U, Vh = U * sign, Vh * sign.T
    U, S, Vh = U[:, : cfg.r], S[: cfg.r], Vh[: cfg.r]  # (o, r), (r,), (r, i) the top-r
    # frozen basis; crop removes it from W using these values as stored (adapter dtype)
    t["lora_U"], t["lora_S"], t["lora_Vh"] = U, S, Vh  # (o, r), (r,), (r, i)
    return t


def forward(m: nn.Module, x: Tensor, y: Tensor, cfg: Config) -> Tensor:
    """New output of target `m`. x: (..., i) input in the adapter dtype; y: (..., o) base output."""
    h0 = (x @ m.lora_Vh.T) * m.lora_S  # (..., r) S-scaled coordinates
    if cfg.k == 1:  # QR of one column only normalises it (its sign cancels in Chat Chat^T)
        Chat = m.lora_c / torch.linalg.vector_norm(m.lora_c)  # (r, 1) unit column
    else:
        Chat, _ = torch.linalg.qr(m.lora_c.float())  # (r, k) orthonormal columns; QR in fp32 (no bf16 kernel)
        Chat = Chat.to(h0.dtype)
    strength = torch.sigmoid(m.lora_strength_logit)  # (k,) in (0, 1)
    d = ((h0 @ Chat) * (-cfg.coeff * strength)) @ Chat.T  # (..., r) the change: contract h0 along span(Chat)
    # crop: y = x W_res^T (+ bias) lacks the top-r part, add (h0 + d) U^T;
    # subtract: y = x W^T (+ bias) is whole, add only the change d U^T
    h = d if cfg.residual == "subtract" else h0 + d  # (..., r)
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
