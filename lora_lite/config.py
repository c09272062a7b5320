"""The fields every adapter config has; each generated module subclasses it with its spec's
hyperparameters (`lora_lite.generated.lora.Config` is `ll.LoRAConfig`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from types import ModuleType

import torch

from .codegen.spec import SpecError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
}


def config_error(msg: str) -> SpecError:
    """The error a bad config value raises: a one-line SpecError (a ValueError)."""
    return SpecError([msg])


def as_dtype(value: torch.dtype | str, what: str = "dtype") -> torch.dtype:
    """torch dtype from a dtype or its name ('bfloat16', 'torch.bfloat16', 'bf16'); SpecError otherwise."""
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise config_error(f"{what}: {value} is not a floating-point dtype")
        return value
    key = str(value).removeprefix("torch.") if isinstance(value, str) else None
    if key not in _DTYPES:
        raise config_error(f"{what}: unknown dtype {value!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


RESIDUAL_MODES = ("none", "crop", "subtract")
SHARED_KEYS = ("dtype", "target_names", "layers", "residual")  # AdapterConfig's fields, as errors list them


def allowed_keys(gen: ModuleType) -> list[str]:
    """Keyword arguments a variant's Config takes: its spec's hyperparameters, then SHARED_KEYS."""
    return list(gen.BOUNDS) + list(SHARED_KEYS)


def unknown_key(gen: ModuleType, key: str) -> SpecError:
    """The one-line SpecError for a keyword the variant's Config does not take (listing those it does)."""
    return config_error(f"{gen.NAME}: unknown override {key!r}; allowed: {', '.join(allowed_keys(gen))}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class AdapterConfig:
    """Fields shared by every variant's config.

    target_names: regexes, `re.search` on module names; None = the spec's default targets.
    layers: block indices to adapt, read from names like `.layers.3.`; None = all blocks.
    dtype: dtype of the adapter tensors; the hook casts the input to it and the result back.
    residual: for variants with a frozen part (SVD-like bases: PiSSA, the AntiPaSTO family),
        "crop" (the base weight holds W - frozen part while attached) or "subtract" (W is never
        written; the hook takes the frozen part out of the output: needed on 4/8-bit bases, and
        detach is exact). None = the spec's residual; after construction it holds the value
        in use. Variants without a frozen part take only "none".
    """

    target_names: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    dtype: torch.dtype = torch.float32
    residual: str | None = None

    def __new__(cls, *args, **kwargs):
        """SpecError for a keyword this Config has no field for (ll.LoRAConfig(rr=3)), the message
        ll.from_spec gives, instead of the dataclass __init__'s TypeError. Unpickling and copying
        call __new__ with no keywords, so they pass through."""
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in kwargs:
            if key not in fields and hasattr(cls.variant(), "BOUNDS"):
                raise unknown_key(cls.variant(), key)
        return super().__new__(cls)

    def __post_init__(self):
        """Validate and normalise every field. SpecError (a ValueError), one line naming the
        field and value: an unknown dtype, empty or non-string target_names, non-integer
        layers, a residual the variant does not take, a hyperparameter of the wrong type,
        non-finite, or outside the spec's [min, max] (BOUNDS in the generated module)."""
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        gen = self.variant()
        if not hasattr(gen, "BOUNDS"):
            raise config_error(
                f"{type(self).__name__} is the base class; use ll.from_spec(name) or a typed config (ll.LoRAConfig)"
            )
        cls = gen.NAME  # errors read `lora.alpha=nan is not finite`
        set_("dtype", as_dtype(self.dtype, f"{cls}.dtype"))
        if self.target_names is not None:
            names = (self.target_names,) if isinstance(self.target_names, str) else self.target_names
            if not isinstance(names, (tuple, list)) or not names or not all(isinstance(n, str) and n for n in names):
                raise config_error(f"{cls}.target_names: expected non-empty regex strings, got {self.target_names!r}")
            set_("target_names", tuple(names))
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else self.layers
            if not isinstance(layers, (tuple, list, range)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers
            ):
                raise config_error(f"{cls}.layers: expected integers, got {self.layers!r}")
            set_("layers", tuple(layers))
        allowed = gen.RESIDUALS
        if self.residual is None:
            set_("residual", gen.RESIDUAL)
        elif not isinstance(self.residual, str) or self.residual not in RESIDUAL_MODES:
            raise config_error(f"{cls}.residual: {self.residual!r} is not one of {list(RESIDUAL_MODES)}")
        elif self.residual not in allowed:
            why = (
                "it has no frozen part to crop or subtract"
                if allowed == ("none",)
                else "its adapter holds the top-r part of W, which 'none' would count twice"
            )
            raise config_error(f"{cls}.residual={self.residual!r}: {gen.NAME} takes {list(allowed)} ({why})")
        for f in dataclasses.fields(self):
            if f.name not in gen.BOUNDS:
                continue
            v = getattr(self, f.name)
            want = f.type if isinstance(f.type, str) else f.type.__name__
            if want == "float" and isinstance(v, int) and not isinstance(v, bool):
                if abs(v) > 2**1023:  # float() would overflow
                    raise config_error(f"{cls}.{f.name}: an int of {len(str(abs(v)))} digits overflows a float")
                v = float(v)
                set_(f.name, v)
            if want == "float" and isinstance(v, float) and not math.isfinite(v):
                raise config_error(f"{cls}.{f.name}={v!r} is not finite (expected finite float)")
            ok = {
                "int": isinstance(v, int) and not isinstance(v, bool),
                "float": isinstance(v, float),
                "bool": isinstance(v, bool),
            }[want]
            if not ok:
                raise config_error(f"{cls}.{f.name}: expected {want}, got {v!r}")
            lo, hi = gen.BOUNDS[f.name]
            if lo is not None and v < lo:
                raise config_error(f"{cls}.{f.name}={v!r} is below its minimum {lo}")
            if hi is not None and v > hi:
                raise config_error(f"{cls}.{f.name}={v!r} is above its maximum {hi}")

    @classmethod
    def variant(cls) -> ModuleType:
        """The generated module that defines this config (its math: init, forward, ...)."""
        return sys.modules[cls.__module__]

    def hyperparameters(self) -> dict:
        """The spec's hyperparameters with their values (no target_names/layers/dtype/residual)."""
        return {k: getattr(self, k) for k in self.variant().BOUNDS}

    def to_dict(self) -> dict:
        """JSON-ready dict of every field (dtype as its name, tuples as lists)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.dtype):
                v = dtype_name(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out
