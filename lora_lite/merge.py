"""Fold an attached adapter into the model's weights: ll.merge returns a plain model.

Every variant's change is linear in x for fixed adapter tensors, so each adapted layer is an
affine map x -> x W'^T + b'. merge reads W' and b' off the layer's own hook: an output hook F
(y -> F(x, y)) gives b' = F(0, b) and W'^T = F(I, W^T + b) - b'; an input hook H gives
W' = W H(I)^T and leaves the bias alone. No variant-specific code, so a new spec merges too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .runtime import AttachError, InputHook, OutputHook, detach, is_quantized, quantization, state


@torch.no_grad()
def merged_weight(t, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """(W' (o, i), b' (o,) or None) in fp32 for one target, as its hook computes the layer now.

    Probes the hook with the identity (i, i) in fp32, so a bf16 W is rounded once, at the end.
    """
    m, gen = t.module, t.cfg.variant()
    W = m.weight.detach().float()  # (o, i) W, or W_res for residual crop
    bias = getattr(m, "bias", None)
    b = bias.detach().float() if bias is not None else None
    eye = torch.eye(W.shape[1], dtype=torch.float32, device=W.device)  # (i, i)
    if gen.HOOK == "input":
        out = InputHook(t, dtype)(m, (eye,))
        M_T = eye if out is None else out[0].float()  # (i, i) rows H(e_j)
        return W @ M_T.T, b  # (o, i): x H^T W^T = x (W H)^T
    hook = OutputHook(t, dtype)
    y0 = b[None] if b is not None else torch.zeros(1, W.shape[0], device=W.device)  # (1, o) F's input at x = 0
    yI = W.T + y0  # (i, o) base outputs of the rows of I (x W^T for x = I is W^T)
    F0 = hook(m, (torch.zeros(1, W.shape[1], device=W.device),), y0)
    FI = hook(m, (eye,), yI)
    F0 = y0 if F0 is None else F0.float()  # (1, o)
    FI = yI if FI is None else FI.float()  # (i, o)
    new_b = F0[0] if b is not None else None
    if b is None and bool(F0.abs().max() > 0):
        raise AttachError(f"merge: {t.name}: the adapter adds a bias but the layer has none")
    return (FI - F0).T, new_b  # (o, i)


def merge(model: nn.Module) -> nn.Module:
    """Fold the attached adapter, at its current ll.scale and coeff, into weights and biases;
    detach it; return `model`, now a plain model with no lora-lite state, hooks or tensors.

    After merge, model(x) equals the adapted model(x) within fp32 rounding (about 1e-6 relative
    measured on the tiny test models; a bf16 W is rounded once, from fp32: no worse than PEFT's
    `merge_and_unload`, which adds a bf16-rounded delta in bf16). IA3 scales the bias too.
    `save_pretrained` / `from_pretrained` then round-trip like any model.
    Raises AttachError, leaving the model unchanged, when nothing is attached, when the adapter
    is switched off (inside ll.disabled), or when a target is a quantized (bitsandbytes) layer:
    load the base in float (or dequantize it, e.g. transformers' `model.dequantize()`), attach or
    ll.load the adapter there, then merge.
    Source: PEFT's `merge_and_unload` (peft/tuners/tuners_utils.py), here computed from the
    hook itself rather than per-variant delta_weight formulas.
    """
    st = state(model)
    if st is None:
        raise AttachError("merge: no lora-lite adapter is attached to this model (nothing to merge)")
    for name, t in st.targets.items():
        if is_quantized(t.module):
            raise AttachError(
                f"merge: {name} is quantized ({quantization(t.module)}); merging would rewrite its quantized "
                "weight. Load the base model in float (or dequantize it), ll.load the adapter there, then merge"
            )
        if not t.enabled:
            raise AttachError(f"merge: adapter 'default' is switched off (inside ll.disabled) at {name}")
    new = {name: merged_weight(t, st.cfg.dtype) for name, t in st.targets.items()}  # nothing changed yet
    modules = {name: t.module for name, t in st.targets.items()}
    detach(model)
    with torch.no_grad():
        for name, (W, b) in new.items():
            m = modules[name]
            m.weight.copy_(W.to(m.weight.dtype))
            if b is not None:
                m.bias.copy_(b.to(m.bias.dtype))
    return model
