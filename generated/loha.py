# Code generated from specs/loha.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""LoHa: low-rank Hadamard product, the update is the elementwise product of two rank-r matrices.

Hyeon-Woo et al. 2021, FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning, arXiv 2108.06098.
Yeh et al. 2023, Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation, arXiv 2309.14859.
Reference implementation: PEFT peft/tuners/loha/layer.py, class Linear (HadaWeight).

Formula (from the composition):

    s = alpha / r
    dW = s (w1_a w1_b) * (w2_a w2_b)       (* elementwise: rank up to r^2 from 4 rank-r factors)
       = s A12 B12,   A12[o, (p, q)] = w1_a[o, p] w2_a[o, q],   B12[(p, q), i] = w1_b[p, i] w2_b[q, i]
    y = W x + dW x                         (as x B12^T A12^T: no (d_out, d_in) matrix while r^2 (i + o) < i o)

    The elementwise product of two rank-r matrices has rank up to r^2 from 4 r (d_in + d_out)
    / 2 numbers. PEFT forms the (d_out, d_in) update every forward; here it is applied as the
    rank-r^2 product x B12^T A12^T (the row-wise and column-wise Khatri-Rao products of the
    factors) whenever that costs less per token, r^2 (d_in + d_out) < d_in d_out (r = 8 on a
    1024 -> 2048 layer: 16x fewer FLOPs than the dense update); otherwise the dense update.

Identity at init: w2_b = 0, so dW = 0.

PEFT's rank_dropout and module_dropout (default 0) and its Conv layers are not implemented.
The default alpha is PEFT's (8, so s = 1 at r = 8).

Spec: basis=none, core=hadamard, modifiers=[scale alpha_over_r], residual=none, hook=output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

# (w1_a w1_b) * (w2_a w2_b) with a backward that recomputes both products
from lora_lite.runtime import hadamard_product

NAME = "loha"  # the spec's name
TITLE = "LoHa"  # its title
HOOK = "output"  # forward hook: forward() returns the layer's new output
CAST_INPUT = True  # the hook casts x to cfg.dtype for forward() (an input hook casts the result back)
RESIDUAL = "none"  # the base weight is never modified
RESIDUALS = ("none",)  # the values cfg.residual may take
CALIBRATION = "none"  # calibration data is accepted and ignored
STATISTICS = ()  # what init() reads from stats: calibration gathers these
TARGET_NAMES = ("\\.q_proj$", "\\.v_proj$")  # default targets: re.search on module names
LR = 0.001  # recommended AdamW learning rate
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
    """LoHa hyperparameters (defaults from specs/loha.yaml)."""

    r: int = 8  # rank of each factor pair
    alpha: float = 8.0  # scale numerator, s = alpha / r


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_hada_w1_a": (("d_out", "r"), "kaiming_uniform", True),  # first pair, output side (PEFT hada_w1_a)
    "lora_hada_w1_b": (("r", "d_in"), "kaiming_uniform", True),  # first pair, input side (PEFT hada_w1_b)
    "lora_hada_w2_a": (("d_out", "r"), "kaiming_uniform", True),  # second pair, output side (PEFT hada_w2_a)
    "lora_hada_w2_b": (("r", "d_in"), "zeros", True),  # second pair, input side, zero at init (PEFT hada_w2_b)
}


def shapes(cfg: Config, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor for a target whose weight is (d_out, d_in)."""
    return {
        "lora_hada_w1_a": (d_out, cfg.r),
        "lora_hada_w1_b": (cfg.r, d_in),
        "lora_hada_w2_a": (d_out, cfg.r),
        "lora_hada_w2_b": (cfg.r, d_in),
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
    t["lora_hada_w1_a"] = torch.empty(d_out, cfg.r)  # (o, r)
    nn.init.kaiming_uniform_(t["lora_hada_w1_a"], a=math.sqrt(5))  # as nn.Linear (PEFT's lora_A init)
    t["lora_hada_w1_b"] = torch.empty(cfg.r, d_in)  # (r, i)
    nn.init.kaiming_uniform_(t["lora_hada_w1_b"], a=math.sqrt(5))  # as nn.Linear (PEFT's lora_A init)
    t["lora_hada_w2_a"] = torch.empty(d_out, cfg.r)  # (o, r)
    nn.init.kaiming_uniform_(t["lora_hada_w2_a"], a=math.sqrt(5))  # as nn.Linear (PEFT's lora_A init)
    t["lora_hada_w2_b"] = torch.zeros(cfg.r, d_in)  # (r, i)
    return t


def forward(m: nn.Module, x: Tensor, y: Tensor, cfg: Config) -> Tensor:
    """New output of target `m`. x: (..., i) input in the adapter dtype; y: (..., o) base output."""
    s = cfg.alpha / cfg.r
    o, i = m.lora_hada_w1_a.shape[0], m.lora_hada_w1_b.shape[1]
    if cfg.r * cfg.r * (i + o) < i * o:  # the rank-r^2 factored form costs less per token
        A12 = (m.lora_hada_w1_a[:, :, None] * m.lora_hada_w2_a[:, None, :]).flatten(1)  # (o, r*r)
        B12 = (m.lora_hada_w1_b[:, None, :] * m.lora_hada_w2_b[None, :, :]).flatten(0, 1)  # (r*r, i)
        delta = (s * (x @ B12.T)) @ A12.T  # (..., o)
    else:  # r^2 (i + o) >= i o: the dense (o, i) update is the cheaper one
        # dW = s (w1_a w1_b) * (w2_a w2_b); backward forms both products again rather than keep them
        dW = hadamard_product(m.lora_hada_w1_a, m.lora_hada_w1_b, m.lora_hada_w2_a, m.lora_hada_w2_b, s)  # (o, i)
        delta = x @ dW.T  # (..., o)
    return y + delta.to(y.dtype)  # (..., o)


def frozen_weight(m: nn.Module, cfg: Config) -> Tensor:
    """The part of W this adapter takes over, (o, i) fp32, from the stored (rounded) buffers.

    residual crop: attach and load crop the base weight to W_res = W - frozen_weight(); detach
    adds it back. residual subtract: W is never modified; forward() takes this part out of the
    output in factored form, without forming the (o, i) matrix. Raises ValueError without one.
    """
    raise ValueError("loha has no frozen part (residual none)")


def shared(cfg: Config, d_in: int, d_out: int) -> dict[str, Tensor]:
    """The SHARED tensors (fp32), built once per adapter and registered on every target as one
    tensor. d_in, d_out: the largest among the adapter's targets; forward() slices each target's part.
    """
    return {}
