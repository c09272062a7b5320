# Code generated from specs/lora_xs.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""LoRA-XS: frozen top-r singular vectors of W with a trainable r x r matrix between them (r^2 parameters per layer).

Bałazy et al. 2024, LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters,
arXiv 2405.17604.
Reference implementation: none in PEFT (the paper's code keeps A = U S and B = Vh frozen, R trained).

Formula (from the composition):

    W = U diag(S) Vh + W_res    (top-r singular directions of W, fp32)
    h = ((x Vh^T) (I + M)^T) * S    (so U diag(S) M Vh is LoRA-XS's A R B)
    y = x W_res^T + h U^T        (residual crop: W_res stored in the layer)
    y = x W^T + (h - h0) U^T     (residual subtract, h0 = (x Vh^T) * S: W untouched)

Identity at init: M = 0, so the added change U diag(S) M Vh is zero (residual subtract leaves W as it is).

The update lies in the span of the frozen U (outputs) and Vh (inputs). The paper starts R
from a small Gaussian; here M starts at 0 so the start is exact. Residual subtract is the
paper's form (W untouched); crop stores W_res and adds U diag(S) (I + M) Vh back.

Spec: basis=svd+top, core=dense, modifiers=[], residual=subtract (or crop: cfg.residual),
hook=output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

NAME = "lora_xs"  # the spec's name
TITLE = "LoRA-XS"  # its title
HOOK = "output"  # forward hook: forward() returns the layer's new output
CAST_INPUT = True  # the hook casts x to cfg.dtype for forward() (an input hook casts the result back)
RESIDUAL = "subtract"  # default: W is never modified; forward() takes frozen_weight() x out
RESIDUALS = ("crop", "subtract")  # the values cfg.residual may take
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
BOUNDS = {"r": (1, 65536)}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """LoRA-XS hyperparameters (defaults from specs/lora_xs.yaml)."""

    r: int = 8  # number of frozen singular directions


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_M": (("r", "r"), "zeros", True),  # the trainable r x r matrix (LoRA-XS's R)
    "lora_U": (("d_out", "r"), "basis", False),  # frozen output singular vectors
    "lora_S": (("r",), "basis", False),  # frozen singular values
    "lora_Vh": (("r", "d_in"), "basis", False),  # frozen input singular vectors
}


def shapes(cfg: Config, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor for a target whose weight is (d_out, d_in)."""
    return {
        "lora_M": (cfg.r, cfg.r),
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
    t["lora_M"] = torch.zeros(cfg.r, cfg.r)  # (r, r)
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
    z = x @ m.lora_Vh.T  # (..., r) coordinates on the frozen input directions
    # crop: y = x W_res^T (+ bias) lacks the top-r part, add ((I + M) z) S U^T; subtract: only (M z) S U^T
    h = z @ m.lora_M.T if cfg.residual == "subtract" else z + z @ m.lora_M.T  # (..., r)
    delta = (h * m.lora_S) @ m.lora_U.T  # (..., o)
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
