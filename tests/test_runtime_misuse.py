"""Runtime misuse, table-driven: each bad input to a public runtime function (configs, attach,
detach, set_coeff, state, trainable_parameters, calibration) gets a one-line error of our types
(SpecError for config values, AttachError otherwise) naming the layer or value, and the model is
left exactly as it was (conftest.assert_unchanged: state_dict bits, requires_grad, hooks, every
submodule's own train/eval flag, module attributes, adapter state)."""

from __future__ import annotations

import math

import pytest
import torch

import lora_lite as ll


def refused(exc_type, fragment: str, fn, *args, **kw):
    """Call fn; require exc_type (exactly one of our types), the fragment, and a one-line message."""
    with pytest.raises(exc_type) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert fragment in msg, msg
    assert "\n" not in msg and msg.strip() == msg, repr(msg)
    assert isinstance(info.value, (ll.SpecError, ll.AttachError, ll.CheckpointError)), type(info.value)
    return info.value


# --- config values: SpecError (a ValueError) naming the field and value --------------------------

NAN, INF = float("nan"), float("inf")

CONFIG_CASES = {
    "alpha nan through from_spec": (lambda: ll.from_spec("lora", alpha=NAN), "lora.alpha=nan is not finite"),
    "alpha inf typed config": (lambda: ll.LoRAConfig(alpha=INF), "lora.alpha=inf is not finite"),
    "alpha -inf": (lambda: ll.from_spec("dora", alpha=-INF), "dora.alpha=-inf is not finite"),
    "coeff nan": (lambda: ll.from_spec("antipasto", coeff=NAN), "antipasto.coeff=nan is not finite"),
    "lambda0 inf": (lambda: ll.from_spec("delora", lambda0=INF), "delora.lambda0=inf is not finite"),
    "rank below the spec's minimum": (lambda: ll.from_spec("lora", r=0), "lora.r=0 is below its minimum 1"),
    "hra rank below its minimum": (lambda: ll.from_spec("hra", r=1), "hra.r=1 is below its minimum 2"),
    "rank given as a bool": (lambda: ll.from_spec("lora", r=True), "lora.r: expected int, got True"),
    "rank given as a string": (lambda: ll.LoRAConfig(r="8"), "lora.r: expected int, got '8'"),
    "alpha given as a string": (lambda: ll.LoRAConfig(alpha="16"), "lora.alpha: expected float, got '16'"),
    "alpha given as a tensor": (lambda: ll.LoRAConfig(alpha=torch.tensor(1.0)), "lora.alpha: expected float"),
    "target_names not strings": (lambda: ll.LoRAConfig(target_names=5), "lora.target_names: expected non-empty"),
    "target_names empty": (lambda: ll.LoRAConfig(target_names=()), "lora.target_names: expected non-empty"),
    "layers a float": (lambda: ll.LoRAConfig(layers=2.0), "lora.layers: expected integers, got 2.0"),
    "layers with a bool": (lambda: ll.LoRAConfig(layers=[True]), "lora.layers: expected integers"),
    "residual unhashable": (lambda: ll.LoRAConfig(residual=["crop"]), "lora.residual: ['crop'] is not one of"),
    "residual the variant lacks": (lambda: ll.LoRAConfig(residual="crop"), "residual='crop': lora takes ['none']"),
    "dtype not a dtype": (lambda: ll.LoRAConfig(dtype=5), "lora.dtype: unknown dtype 5"),
    "dtype an integer dtype": (lambda: ll.LoRAConfig(dtype=torch.int8), "torch.int8 is not a floating-point dtype"),
    "the base class": (lambda: ll.AdapterConfig(), "AdapterConfig is the base class"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_values_are_one_line_spec_errors(case):
    fn, fragment = CONFIG_CASES[case]
    refused(ll.SpecError, fragment, fn)


def test_config_bounds_come_from_the_generated_module(monkeypatch):
    gen = ll.variant_module("lora")
    monkeypatch.setitem(gen.BOUNDS, "alpha", (0.5, 64.0))
    refused(ll.SpecError, "lora.alpha=128.0 is above its maximum 64.0", ll.LoRAConfig, alpha=128)
    refused(ll.SpecError, "lora.alpha=0.25 is below its minimum 0.5", ll.LoRAConfig, alpha=0.25)
    assert ll.LoRAConfig(alpha=64).alpha == 64.0 and math.isfinite(ll.LoRAConfig().alpha)


def test_config_errors_are_value_errors_as_before():
    assert issubclass(ll.SpecError, ValueError)
    with pytest.raises(ValueError, match="not finite"):
        ll.LoRAConfig(alpha=NAN)
