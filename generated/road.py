# Code generated from specs/road.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""RoAd: 2x2 rotations with a learned angle and scale on pairs of output features.

Liao et al. 2024, RoAd: Parameter-Efficient Fine-Tuning with 2D Rotary Adaptation, arXiv
2409.00119.
Reference implementation: PEFT peft/tuners/road/layer.py, _apply_road.

Formula (from the composition):

    y <- c * y + s * rot(y)    (RoAd: in each group of group_size outputs, feature k < g/2 pairs with
        k + g/2; rot(y_k, y_k+g/2) = (-y_k+g/2, y_k); c = alpha cos(theta), s = alpha sin(theta) with
        road_variant 1: one theta, alpha per pair; 2: per feature; 4: separate theta, alpha for c and s)

    R (W x + b) with R block-diagonal in 2x2 rotations scaled by alpha: elementwise on y, never a
    (d_out, d_out) matrix. As PEFT, the two features of a pair are k and k + g/2 of each group of
    g = group_size outputs (a half-split, as in rotary embeddings), not neighbours.

Identity at init: theta = 0 and alpha = 1, so R = I.

PEFT's variant string ('road_1', 'road_2', 'road_4') is the int road_variant (1, 2 or 4):
the trainable count per target is d_out (variant 1), 2 d_out (2) or 4 d_out (4). d_out must
be a multiple of group_size (checked at attach, naming the layer). The bias is rotated too,
as PEFT does.

Spec: basis=none, core=rotation, modifiers=[], residual=none, hook=output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

NAME = "road"  # the spec's name
TITLE = "RoAd"  # its title
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
PER_RANK = {}  # read over r ** e: clamping r to r_c scales it by (r_c / r) ** e
EMBEDDING = False  # attach refuses nn.Embedding targets
SHARED = ()  # tensors kept once per adapter for every target (frozen; see shared())
RUNTIME_KNOBS = ()  # hyperparameters that may change after attach
RANKS = ()  # hyperparameters clamped per target to min(d_in, d_out)
BOUNDS = {"group_size": (2, 65536), "road_variant": (1, 4)}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """RoAd hyperparameters (defaults from specs/road.yaml)."""

    group_size: int = 64  # outputs per group (even, divides d_out)
    road_variant: int = 1  # 1: theta, alpha per pair; 2: per feature; 4: per feature, separate for cos and sin


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_theta": (("d_out * road_variant // 2",), "zeros", True),  # angles (PEFT road_theta)
    "lora_alpha": (("d_out * road_variant // 2",), "ones", True),  # scales (PEFT road_alpha)
}


def shapes(cfg: Config, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor for a target whose weight is (d_out, d_in)."""
    return {
        "lora_theta": (d_out * cfg.road_variant // 2,),
        "lora_alpha": (d_out * cfg.road_variant // 2,),
    }


def check(cfg: Config, d_in: int, d_out: int) -> None:
    """Raise ValueError (one line) when a layer whose weight is (d_out, d_in) cannot take `cfg`.

    init() calls it at attach; load calls it before reading a target's tensors, so a checkpoint
    whose shapes fit but whose hyperparameters do not fit the layer is refused, not run.
    """
    if d_out % cfg.group_size or cfg.group_size % 2:
        raise ValueError(f"RoAd needs an even group_size dividing d_out={d_out}, got group_size={cfg.group_size}")
    if cfg.road_variant not in (1, 2, 4):
        raise ValueError(f"RoAd's road_variant is 1, 2 or 4, got {cfg.road_variant}")


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
    t["lora_theta"] = torch.zeros(d_out * cfg.road_variant // 2)  # (d_out * road_variant // 2,)
    t["lora_alpha"] = torch.ones(d_out * cfg.road_variant // 2)  # (d_out * road_variant // 2,)
    return t


def forward(m: nn.Module, x: Tensor, y: Tensor, cfg: Config) -> Tensor:
    """New output of target `m`. x: (..., i) input in the adapter dtype; y: (..., o) base output."""
    g = cfg.group_size
    if cfg.road_variant == 1:  # one angle and scale per pair, shared by both halves of the group
        theta = m.lora_theta.reshape(-1, 1, g // 2).expand(-1, 2, -1).reshape(-1)  # (o,)
        alpha = m.lora_alpha.reshape(-1, 1, g // 2).expand(-1, 2, -1).reshape(-1)  # (o,)
        c, s = alpha * theta.cos(), alpha * theta.sin()  # (o,)
    elif cfg.road_variant == 2:  # one angle and scale per feature
        c, s = m.lora_alpha * m.lora_theta.cos(), m.lora_alpha * m.lora_theta.sin()  # (o,)
    else:  # 4: per feature, separate angle and scale for the cos and the sin term
        theta = m.lora_theta.reshape(-1, 2, g)  # (o/g, 2, g): [:, 0] for c, [:, 1] for s
        alpha = m.lora_alpha.reshape(-1, 2, g)  # (o/g, 2, g)
        c, s = (alpha[:, 0] * theta[:, 0].cos()).reshape(-1), (alpha[:, 1] * theta[:, 1].sin()).reshape(-1)  # (o,)
    # c and s are (o,) vectors, so their gradients reduce over the tokens only (not also over pair axes)
    h = y.to(c.dtype)  # (..., o)
    halves = h.unflatten(-1, (-1, 2, g // 2))  # (..., o/g, 2, g/2) the two halves of each group
    rot = torch.stack((-halves[..., 1, :], halves[..., 0, :]), dim=-2).flatten(-3)  # (..., o) pairs turned 90 degrees
    return (h * c + rot * s).to(y.dtype)  # (..., o); the bias is rotated too, as in PEFT


def frozen_weight(m: nn.Module, cfg: Config) -> Tensor:
    """The part of W this adapter takes over, (o, i) fp32, from the stored (rounded) buffers.

    residual crop: attach and load crop the base weight to W_res = W - frozen_weight(); detach
    adds it back. residual subtract: W is never modified; forward() takes this part out of the
    output in factored form, without forming the (o, i) matrix. Raises ValueError without one.
    """
    raise ValueError("road has no frozen part (residual none)")


def shared(cfg: Config, d_in: int, d_out: int) -> dict[str, Tensor]:
    """The SHARED tensors (fp32), built once per adapter and registered on every target as one
    tensor. d_in, d_out: the largest among the adapter's targets; forward() slices each target's part.
    """
    return {}
