"""Attach adapters to any model with plain forward hooks; detach gives the base model back.

The contract, in order (each step finishes before the next; nothing is modified until every
target's tensors are built, so a failure leaves the model as it was):

    attach(model, cfg, calibration_data=None)
      1. find targets: linear-like modules (in_features, out_features, weight) whose names
         match cfg.target_names (re.search) and cfg.layers; lm_head and embeddings excluded
      2. clamp rank hyperparameters per target to min(d_in, d_out) (one warning per target)
      3. calibrate on the *intact* model: input statistics of every target (padding excluded)
      4. build each target's tensors with the variant's init(W, cfg, stats), in fp32
      5. install: freeze every base parameter, register the tensors on the target (names
         start `lora_`; trainable ones as nn.Parameter, frozen ones as buffers), crop W to
         W_res = W - frozen_weight() for RESIDUAL == "crop", register the hook
    A hook returns the layer's new output (output hooks) or new input (input pre-hooks),
    never a delta; the input is cast to cfg.dtype and the result back to the layer's dtype.

    detach(model)
      restores W (W_res + frozen_weight(), within the weight dtype's rounding), removes hooks
      and tensors, and restores every parameter's requires_grad: state_dict keys, values and
      flags are those before attach.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import Tensor, nn

from .calibration import collect_input_stats
from .config import AdapterConfig

STATE_ATTR = "_lora_lite"
EXCLUDE = re.compile(r"(^|\.)(lm_head|embed_tokens|embed_out|wte|wpe|embeddings?)$")
LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")


class AttachError(RuntimeError):
    """attach/detach/load refused; the model was left unchanged."""


@dataclass
class Target:
    """One adapted layer. `cfg` is its own config (rank clamped); set_coeff replaces it."""

    name: str
    module: nn.Module
    cfg: AdapterConfig
    tensors: tuple[str, ...]
    info: dict  # d_in, d_out, weight shape/dtype, quantization, fingerprint
    handle: object = None


@dataclass
class State:
    cfg: AdapterConfig
    variant: ModuleType
    targets: dict[str, Target]
    requires_grad: dict[str, bool] = field(default_factory=dict)


def state(model: nn.Module) -> State | None:
    """The attached adapter's state, or None."""
    return model.__dict__.get(STATE_ATTR)


def is_linear_like(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("in_features", "out_features", "weight")) and isinstance(
        getattr(m, "weight", None), Tensor
    )


def layer_index(name: str) -> int | None:
    """Block index read from a module name (`model.layers.3.self_attn.q_proj` -> 3)."""
    m = LAYER_INDEX.search("." + name + ".")
    return int(m.group(1)) if m else None


def find_targets(model: nn.Module, cfg: AdapterConfig) -> dict[str, nn.Module]:
    """Modules the config adapts, by name. AttachError when none match (lists candidates)."""
    gen = cfg.variant()
    patterns = cfg.target_names or gen.TARGET_NAMES
    regexes = [re.compile(p) for p in patterns]
    found, linear = {}, []
    for name, m in model.named_modules():
        if not name or not is_linear_like(m) or EXCLUDE.search(name):
            continue
        linear.append(name)
        if not any(rx.search(name) for rx in regexes):
            continue
        if cfg.layers is not None and layer_index(name) not in cfg.layers:
            continue
        found[name] = m
    if not found:
        sample = ", ".join(linear[:8]) + (" ..." if len(linear) > 8 else "") or "(none)"
        raise AttachError(
            f"{gen.NAME}: no linear layer matches target_names={list(patterns)} "
            f"layers={cfg.layers}; linear layers here: {sample}"
        )
    return found


def is_quantized(m: nn.Module) -> bool:
    """True for bitsandbytes 4/8-bit layers (and anything whose weight is not floating point)."""
    return not m.weight.dtype.is_floating_point or type(m.weight).__name__ in ("Params4bit", "Int8Params")


def base_weight(m: nn.Module) -> Tensor:
    """The layer's weight as fp32 (d_out, d_in), dequantized for bitsandbytes layers."""
    w = m.weight
    if type(w).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state).float()
    if type(w).__name__ == "Int8Params" or w.dtype == torch.int8:
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(m.state, "SCB", None) if hasattr(m, "state") else None
        if scb is None:
            raise AttachError("int8 layer without quantization statistics (SCB): move it to its device first")
        return w.data.float() * (scb.float()[:, None] / 127.0)
    return w.detach().float()


def weight_fingerprint(W: Tensor, k: int = 8) -> list[float]:
    """A cheap identity check of a weight (o, i): [||W||_F, k projections u_j^T W v_j * sqrt(o i)].

    u_j, v_j are fixed unit vectors (seed 0), so the projections have the same scale as the
    norm; two different random weights differ by ~130%, rounding/quantization by a few percent.
    """
    o, i = W.shape
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(k, o, generator=g), dim=1).to(W.device)
    v = torch.nn.functional.normalize(torch.randn(k, i, generator=g), dim=1).to(W.device)
    proj = ((u @ W.float()) * v).sum(1) * math.sqrt(o * i)  # (k,)
    return [float(W.float().norm())] + [float(p) for p in proj]


def fingerprint_distance(a: list[float], b: list[float]) -> float:
    """Relative distance ||a - b|| / ||b|| between two fingerprints."""
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((ta - tb).norm() / tb.norm().clamp_min(1e-30))


def target_config(cfg: AdapterConfig, name: str, m: nn.Module, warn: bool = True) -> AdapterConfig:
    """The config for one target: rank hyperparameters clamped to min(d_in, d_out)."""
    gen = cfg.variant()
    limit = min(m.in_features, m.out_features)
    changes = {}
    for k in gen.RANKS:
        if getattr(cfg, k) > limit:
            changes[k] = limit
            if warn:
                warnings.warn(
                    f"{gen.NAME}: {name}: {k}={getattr(cfg, k)} exceeds min(d_in, d_out)={limit}; "
                    f"using {k}={limit} for this layer",
                    stacklevel=3,
                )
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _build(gen: ModuleType, name: str, m: nn.Module, cfg_t: AdapterConfig, stats: dict | None) -> dict:
    W = base_weight(m)
    try:
        tensors = gen.init(W, cfg_t, stats)
    except ValueError as e:  # a variant's init refuses this layer (odd HRA rank, too little data)
        raise ValueError(f"{gen.NAME}: {name}: {e}") from None
    want = gen.shapes(cfg_t, m.in_features, m.out_features)
    if set(tensors) != set(want):
        raise AttachError(f"{gen.NAME}: {name}: init returned {sorted(tensors)}, spec declares {sorted(want)}")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(want[k]):
            raise AttachError(f"{gen.NAME}: {name}: {k} has shape {tuple(t.shape)}, spec says {tuple(want[k])}")
        if not torch.isfinite(t).all():
            raise AttachError(f"{gen.NAME}: {name}: {k} is not finite after init (check the weights/calibration)")
    info = {
        "d_in": m.in_features,
        "d_out": m.out_features,
        "weight_shape": list(m.weight.shape),
        "weight_dtype": str(m.weight.dtype).removeprefix("torch."),
        "quantization": type(m.weight).__name__ if is_quantized(m) else None,
        "fingerprint": weight_fingerprint(W),
    }
    return {"tensors": tensors, "info": info}


def attach(model: nn.Module, cfg: AdapterConfig, calibration_data=None, *, progress: bool = True) -> nn.Module:
    """Attach the adapter `cfg` describes to every matching layer of `model`; returns `model`.

    calibration_data: iterable of batches (dicts of input_ids/attention_mask/..., tuples, or
    tensors) for data-driven bases; ignored by variants that need none. Raises AttachError
    (already attached, no targets, missing calibration data, crop on a quantized layer) or
    ValueError (bad calibration data) and leaves the model unchanged.
    """
    if not isinstance(cfg, AdapterConfig):
        raise TypeError(
            f"attach: expected a config from ll.from_spec(...) or ll.LoRAConfig(...), got {type(cfg).__name__}"
        )
    if state(model) is not None:
        raise AttachError(
            f"model already has a {state(model).variant.NAME} adapter attached; call ll.detach(model) first"
        )
    gen = cfg.variant()
    targets = find_targets(model, cfg)
    if gen.RESIDUAL == "crop":
        for name, m in targets.items():
            if is_quantized(m):
                raise AttachError(
                    f"{gen.NAME}: {name} is quantized ({type(m.weight).__name__}); crop would rewrite "
                    f"its weight. Use residual='subtract', dequantize first, or use LoRA/IA3"
                )
    cfgs = {name: target_config(cfg, name, m) for name, m in targets.items()}
    stats = None
    if gen.CALIBRATION == "required" and calibration_data is None:
        raise AttachError(f"{gen.NAME} needs calibration_data: pass ll.attach(model, cfg, calibration_data=batches)")
    if gen.CALIBRATION != "none" and calibration_data is not None:
        stats = collect_input_stats(model, targets, calibration_data, progress=progress)
    built = {name: _build(gen, name, m, cfgs[name], stats[name] if stats else None) for name, m in targets.items()}
    install(model, cfg, {name: (targets[name], cfgs[name], b["tensors"], b["info"]) for name, b in built.items()})
    return model


def install(model: nn.Module, cfg: AdapterConfig, per_target: dict) -> State:
    """Register tensors, crop, add hooks (attach step 5; load uses it too). No input checks here."""
    gen = cfg.variant()
    st = State(
        cfg=cfg, variant=gen, targets={}, requires_grad={n: p.requires_grad for n, p in model.named_parameters()}
    )
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = {name: spec[2] for name, spec in gen.PARAMS.items()}
    for name, (m, cfg_t, tensors, info) in per_target.items():
        device = m.weight.device if m.weight.device.type != "meta" else None
        for k, t in tensors.items():
            t = t.detach().to(device=device, dtype=cfg.dtype).clone()
            if trainable[k]:
                m.register_parameter(k, nn.Parameter(t))
            else:
                m.register_buffer(k, t)
        target = Target(name=name, module=m, cfg=cfg_t, tensors=tuple(tensors), info=info)
        if gen.RESIDUAL == "crop":
            with torch.no_grad():
                w = m.weight
                w.copy_((w.float() - gen.frozen_weight(m, cfg_t)).to(w.dtype))
        target.handle = _register_hook(gen, target, cfg.dtype)
        st.targets[name] = target
    model.__dict__[STATE_ATTR] = st
    return st


def _register_hook(gen: ModuleType, target: Target, dtype: torch.dtype):
    if gen.HOOK == "output":

        def output_hook(m, args, y):
            return gen.forward(m, args[0].to(dtype), y, target.cfg)

        return target.module.register_forward_hook(output_hook)

    def input_hook(m, args):
        x = args[0]
        return (gen.forward(m, x.to(dtype), target.cfg).to(x.dtype), *args[1:])

    return target.module.register_forward_pre_hook(input_hook)


def detach(model: nn.Module) -> nn.Module:
    """Remove the adapter and give the base model back (see the module docstring); returns `model`.

    Raises AttachError when nothing is attached.
    """
    st = state(model)
    if st is None:
        raise AttachError("detach: no lora-lite adapter is attached to this model")
    gen = st.variant
    for t in st.targets.values():
        m = t.module
        t.handle.remove()
        if gen.RESIDUAL == "crop":
            with torch.no_grad():
                w = m.weight
                w.copy_((w.float() + gen.frozen_weight(m, t.cfg)).to(w.dtype))
        for k in t.tensors:
            m._parameters.pop(k, None)
            m._buffers.pop(k, None)
    params = dict(model.named_parameters())
    for n, flag in st.requires_grad.items():
        if n in params:
            params[n].requires_grad_(flag)
    del model.__dict__[STATE_ATTR]
    return model


def set_coeff(model: nn.Module, value: float) -> None:
    """Change the `coeff` knob of an attached adapter without re-attaching (0 = identity).

    Raises AttachError when nothing is attached or the variant has no `coeff`.
    """
    st = state(model)
    if st is None:
        raise AttachError("set_coeff: no lora-lite adapter is attached to this model")
    if "coeff" not in st.variant.RUNTIME_KNOBS:
        raise AttachError(
            f"set_coeff: {st.variant.NAME} has no runtime 'coeff' knob "
            f"(its knobs: {list(st.variant.RUNTIME_KNOBS) or 'none'})"
        )
    if not math.isfinite(float(value)):
        raise ValueError(f"set_coeff: coeff must be a finite number, got {value!r}")
    st.cfg = dataclasses.replace(st.cfg, coeff=float(value))
    for t in st.targets.values():
        t.cfg = dataclasses.replace(t.cfg, coeff=float(value))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimiser should train: those with requires_grad."""
    return [p for p in model.parameters() if p.requires_grad]
