"""Switch an attached adapter off or turn it down without detaching: ll.disabled, ll.scale.

    with ll.disabled(model):          # the base model's outputs (a DPO / KL reference)
        ref_logits = model(**batch).logits
    ll.scale(model, 0.5)              # y = y_base + 0.5 (y_adapted - y_base) on every target

Neither changes a tensor: the hooks read each target's `enabled` flag and `scale`. Both take
the model or a wrapper of it (torch.compile, DDP, accelerate, FSDP2; see lora_lite.wrappers).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

from torch import nn

from .runtime import AttachError, Target, states


def _targets(model: nn.Module, what: str, name: str | None) -> list[Target]:
    every = states(model)
    if not every:
        raise AttachError(f"{what}: no lora-lite adapter is attached to this model")
    if name is not None and name not in every:
        raise AttachError(f"{what}: no adapter named {repr(name)[:60]} (attached: {list(every)})")
    return [t for n, st in every.items() if name in (None, n) for t in st.targets.values()]


@contextmanager
def disabled(model: nn.Module, name: str | None = None):
    """Context manager: inside it the model gives the base model's outputs (name: only that
    adapter is switched off); on exit (also after an exception) each target's previous on/off
    state comes back, so it nests, also with ll.set_active.

    Bit for bit the base where W is not cropped (the hooks return the layer's own output or leave
    its input alone); for residual crop the hook adds the frozen part back to x W_res^T (in
    factored form; as x frozen_weight()^T for a cropped DoRA-type variant, whose forward is not
    linear in y): the base within the rounding of the weight dtype. No tensor, requires_grad
    flag or hook is changed. Raises AttachError when nothing (or no adapter `name`) is attached.
    Source: PEFT's `PeftModel.disable_adapter()` (peft/peft_model.py), which for PiSSA gives
    W_res's outputs instead (see the README's known divergences).
    """
    targets = _targets(model, "disabled", name)
    before = [t.enabled for t in targets]
    for t in targets:
        t.enabled = False
    try:
        yield model
    finally:
        for t, on in zip(targets, before):
            t.enabled = on


def scale(model: nn.Module, value: float, name: str | None = None) -> None:
    """Scale an adapter's effect (name None: every attached adapter's):
    y = y_base + value (y_adapted - y_base) on each of its targets.

    value 0 equals ll.disabled, 1 the adapter as trained; other values interpolate (or, above 1,
    extrapolate). Input-side variants (HRA, IA3-FF) interpolate their new input the same way:
    x -> x + value (H(x) - x). For LoRA-type cores (y_adapted - y_base = s B A x) this is PEFT's
    `rescale_adapter_scale(model, value)` (peft/helpers.py), which multiplies `scaling`; it is
    not AntiPaSTO's `coeff`, which acts on the gain logits through ELU (ll.set_coeff).
    Saved in checkpoints (per target) and applied by ll.merge and ll.export_peft.
    Raises AttachError (a ValueError) when nothing (or no adapter `name`) is attached, or for a
    value that is not a finite number (bool, NaN, inf, an int past float range); nothing changes then.
    """
    targets = _targets(model, "scale", name)
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < math.inf
    if not finite or (isinstance(value, int) and abs(value) > 2**1023):  # float() would overflow
        raise AttachError(f"scale: value must be a finite number, got {repr(value)[:40]}")
    for t in targets:
        t.scale = float(value)
