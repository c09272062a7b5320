# Code generated from specs/rslora.yaml by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""rsLoRA: LoRA with the rank-stabilised scale alpha / sqrt(r), so larger ranks keep learning.

Kalajdzievic 2023, A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA, arXiv
2312.03732.
Reference implementation: PEFT peft/tuners/lora/layer.py, LoraLayer.update_layer (use_rslora=True).

Formula (from the composition):

    s = alpha / sqrt(r)    (rsLoRA)
    y = W x + s B A x

Identity at init: B = 0, so the update s B A x is zero.

Spec: basis=none, core=lowrank, modifiers=[scale alpha_over_sqrt_r], residual=none, hook=output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_lite.config import AdapterConfig

# the layer's own reads: W through its forward (float or 4/8-bit), an nn.Embedding's token lookup
from lora_lite.runtime import embedding_lookup, is_embedding

NAME = "rslora"  # the spec's name
TITLE = "rsLoRA"  # its title
HOOK = "output"  # forward hook: forward() returns the layer's new output
CAST_INPUT = True  # the hook casts x to cfg.dtype for forward() (an input hook casts the result back)
RESIDUAL = "none"  # the base weight is never modified
RESIDUALS = ("none",)  # the values cfg.residual may take
CALIBRATION = "none"  # calibration data is accepted and ignored
STATISTICS = ()  # what init() reads from stats: calibration gathers these
TARGET_NAMES = ("\\.q_proj$", "\\.v_proj$")  # default targets: re.search on module names
LR = 0.0001  # recommended AdamW learning rate
QUANTIZED_BASE = True  # bitsandbytes 4/8-bit targets work (with residual subtract where W is cropped)
USES_BASE_WEIGHT = False  # the math never reads W after init
PER_RANK = {"alpha": 0.5}  # read over r ** e: clamping r to r_c scales it by (r_c / r) ** e
EMBEDDING = True  # nn.Embedding targets work (token ids in; PEFT's layout and init)
SHARED = ()  # tensors kept once per adapter for every target (frozen; see shared())
RUNTIME_KNOBS = ()  # hyperparameters that may change after attach
RANKS = ("r",)  # hyperparameters clamped per target to min(d_in, d_out)
BOUNDS = {"r": (1, 65536), "alpha": (-1000000.0, 1000000.0)}  # (min, max) of each hyperparameter; None for a bool


@dataclass(frozen=True)
class Config(AdapterConfig):
    """rsLoRA hyperparameters (defaults from specs/rslora.yaml)."""

    r: int = 8  # rank of the update
    alpha: float = 16.0  # scale numerator, s = alpha / sqrt(r)


# Adapter tensors registered on each target: name -> (shape, init, trainable)
PARAMS = {
    "lora_A": (("r", "d_in"), "kaiming_uniform", True),  # down-projection
    "lora_B": (("d_out", "r"), "zeros", True),  # up-projection
}


def shapes(cfg: Config, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shape of each adapter tensor for a target whose weight is (d_out, d_in)."""
    return {
        "lora_A": (cfg.r, d_in),
        "lora_B": (d_out, cfg.r),
    }


def check(cfg: Config, d_in: int, d_out: int) -> None:
    """Raise ValueError (one line) when a layer whose weight is (d_out, d_in) cannot take `cfg`.

    init() calls it at attach; load calls it before reading a target's tensors, so a checkpoint
    whose shapes fit but whose hyperparameters do not fit the layer is refused, not run.
    """
    return None  # every layer takes it


# i: d_in, o: d_out, r: rank, ...: leading (batch, token) dims
def init(W: Tensor, cfg: Config, stats: dict | None = None, embedding: bool = False) -> dict[str, Tensor]:
    """Initial adapter tensors (fp32) for one target. W: (o, i) base weight, fp32, dequantized.

    `stats` holds statistics of this layer's input, gathered on the intact model, when
    calibration data was given: "second_moment" (i, i) = mean of x x^T and "mean" (i,) = mean
    of x over the counted tokens (padding and labels == -100 excluded), and "tokens", their
    count. Otherwise it is None.
    `embedding`: the target is an nn.Embedding, W its weight transposed, (embedding_dim,
    num_embeddings): o = embedding_dim, i = num_embeddings.
    """
    d_out, d_in = W.shape
    t = {}
    t["lora_A"] = torch.empty(cfg.r, d_in)  # (r, i)
    nn.init.kaiming_uniform_(t["lora_A"], a=math.sqrt(5))  # as nn.Linear (PEFT's lora_A init)
    t["lora_B"] = torch.zeros(d_out, cfg.r)  # (o, r)
    if embedding:  # an nn.Embedding (PEFT's layout, the reverse of a linear layer's): A = 0, B ~ N(0, 1)
        t["lora_A"], t["lora_B"] = torch.zeros(cfg.r, d_in), torch.randn(d_out, cfg.r)  # (r, i), (o, r)
    return t


def forward(m: nn.Module, x: Tensor, y: Tensor, cfg: Config) -> Tensor:
    """New output of target `m`. x: (..., i) input in the adapter dtype; y: (..., o) base output."""
    s = cfg.alpha / math.sqrt(cfg.r)  # rsLoRA: the update's scale stays stable as r grows
    # an nn.Embedding's x holds token ids (...,): x A^T is a lookup of A's columns (PEFT's lora_embedding_A)
    xa = embedding_lookup(m, x, m.lora_A) if is_embedding(m) else x @ m.lora_A.T  # (..., r)
    delta = (s * xa) @ m.lora_B.T  # (..., o); s scales the (..., r) factor
    return y + delta.to(y.dtype)  # (..., o)


def frozen_weight(m: nn.Module, cfg: Config) -> Tensor:
    """The part of W this adapter takes over, (o, i) fp32, from the stored (rounded) buffers.

    residual crop: attach and load crop the base weight to W_res = W - frozen_weight(); detach
    adds it back. residual subtract: W is never modified; forward() takes this part out of the
    output in factored form, without forming the (o, i) matrix. Raises ValueError without one.
    """
    raise ValueError("rslora has no frozen part (residual none)")


def shared(cfg: Config, d_in: int, d_out: int) -> dict[str, Tensor]:
    """The SHARED tensors (fp32), built once per adapter and registered on every target as one
    tensor. d_in, d_out: the largest among the adapter's targets; forward() slices each target's part.
    """
    return {}
