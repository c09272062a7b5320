"""Helpers for tests and examples: quantize a float model's linear layers with bitsandbytes.

    quantize(model, "nf4" | "fp4" | "int8", device="cpu") -> model   (in place)

Every nn.Linear whose name is not excluded (lm_head and embeddings, as attach excludes them) is
replaced by a bitsandbytes Linear4bit (nf4/fp4, blockwise 4-bit with nested statistics, as
QLoRA) or Linear8bitLt (int8 rows with absmax scales, LLM.int8() with threshold 0) holding the
same weights, quantized by bitsandbytes when the module moves to `device`. The result is the
kind of model `transformers` builds with BitsAndBytesConfig, without needing a hub download.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .runtime import EXCLUDE

KINDS = ("nf4", "fp4", "int8")


def quantize(
    model: nn.Module, kind: str = "nf4", device: str | torch.device = "cpu", exclude: re.Pattern = EXCLUDE
) -> nn.Module:
    """Replace each nn.Linear of `model` (name not matching `exclude`) by a bitsandbytes layer.

    kind: "nf4" or "fp4" (Linear4bit, compute dtype = the weight's dtype) or "int8"
    (Linear8bitLt, has_fp16_weights=False, threshold=0). 4-bit needs in_features * out_features
    divisible by the blocksize (64). The model is moved to `device`, which quantizes the
    weights (bitsandbytes 0.50 does so on CPU and CUDA). Bias values and requires_grad flags
    are kept. On CPU, 4-bit layers get `support_avx512bf16_for_cpu = False`: otherwise
    bitsandbytes repacks them on the first eval-mode forward on AVX512-BF16 machines, after which
    they round absmax to bf16 and pass no gradient (results would depend on the CPU).
    Raises ValueError for an unknown kind, ImportError without bitsandbytes.
    """
    if kind not in KINDS:
        raise ValueError(f"quantize: kind must be one of {list(KINDS)}, got {kind!r}")
    import bitsandbytes as bnb

    replaced = []
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear or exclude.search(name):
            continue
        w = m.weight.detach().clone()
        bias = m.bias is not None
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(m.in_features, m.out_features, bias=bias, has_fp16_weights=False, threshold=0.0)
            q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=bias, compute_dtype=w.dtype, quant_type=kind)
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=kind, module=q)
            q.support_avx512bf16_for_cpu = False
        if bias:
            q.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
        q.train(m.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
        replaced.append(name)
    if not replaced:
        raise ValueError("quantize: no nn.Linear to replace (lm_head and embeddings are kept in float)")
    return model.to(device)
