"""Switch an attached adapter off or turn it down without detaching: ll.disabled, ll.scale.

    with ll.disabled(model):          # the base model's outputs (a DPO / KL reference)
        ref_logits = model(**batch).logits
    ll.scale(model, 0.5)              # y = y_base + 0.5 (y_adapted - y_base) on every target

Neither changes a tensor: the hooks read each target's `enabled` flag and `scale`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

from torch import nn

from .runtime import AttachError, State, state


def _attached(model: nn.Module, what: str, name: str | None) -> State:
    st = state(model)
    if st is None:
        raise AttachError(f"{what}: no lora-lite adapter is attached to this model")
    if name not in (None, "default"):
        raise AttachError(f"{what}: no adapter named {name!r} (attached: ['default'])")
    return st


@contextmanager
def disabled(model: nn.Module, name: str | None = None):
    """Context manager: inside it the model gives the base model's outputs; on exit (also after an
    exception) each target's previous on/off state comes back, so it nests.

    Bit for bit the base where W is not cropped (the hooks return the layer's own output or leave
    its input alone); for residual crop the hook adds the frozen part back to x W_res^T in
    factored form: the base within the rounding of the weight dtype (DoRA/IA3-style variants
    are never cropped). No tensor, requires_grad flag or hook is changed. Raises AttachError when
    nothing (or no adapter `name`) is attached.
    Source: PEFT's `PeftModel.disable_adapter()` (peft/peft_model.py), which for PiSSA gives
    W_res's outputs instead (see the README's known divergences).
    """
    st = _attached(model, "disabled", name)
    before = {n: t.enabled for n, t in st.targets.items()}
    for t in st.targets.values():
        t.enabled = False
    try:
        yield model
    finally:
        for n, t in st.targets.items():
            t.enabled = before.get(n, True)


def scale(model: nn.Module, value: float, name: str | None = None) -> None:
    """Scale the attached adapter's effect: y = y_base + value (y_adapted - y_base) on every target.

    value 0 equals ll.disabled, 1 the adapter as trained; other values interpolate (or, above 1,
    extrapolate). Input-side variants (HRA, IA3-FF) interpolate their new input the same way:
    x -> x + value (H(x) - x). For LoRA-type cores (y_adapted - y_base = s B A x) this is PEFT's
    `rescale_adapter_scale(model, value)` (peft/helpers.py), which multiplies `scaling`; it is
    not AntiPaSTO's `coeff`, which acts on the gain logits through ELU (ll.set_coeff).
    Saved in checkpoints (per target) and applied by ll.merge and ll.export_peft.
    Raises AttachError when nothing is attached, ValueError for a non-finite value.
    """
    st = _attached(model, "scale", name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"scale: value must be a finite number, got {value!r}")
    for t in st.targets.values():
        t.scale = float(value)
