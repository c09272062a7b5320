"""Self-describing adapter checkpoints: safetensors tensors + JSON metadata.

File layout (one safetensors file):
    tensors   "<target module name>.<tensor name>" -> adapter tensor (trainable and frozen)
    metadata  {"lora_lite": JSON} with format_version, spec name and YAML text (so a custom
              spec reloads anywhere), config (hyperparameters, targets, dtype), and per target:
              its own hyperparameters (clamped rank), base weight shape/dtype/quantization and a
              fingerprint of the original (pre-crop, dequantized) weight.

load() needs no calibration data: cropped variants rebuild W_res from the saved basis.
A checkpoint saved on a float base loads onto a bitsandbytes 4/8-bit one and the reverse
(residual crop needs load(..., residual="subtract") on a quantized base); each target's
metadata then says what the adapter was trained on (loaded_from_quantization).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .registry import spec_text, variant_from_text
from .runtime import (
    AttachError,
    base_weight,
    check_quantized,
    check_tied,
    fingerprint_distance,
    install,
    is_linear_like,
    layer_dims,
    state,
    target_info,
    warn_if_wrapped_already,
)
from .wrappers import full, is_writer, unwrap

FORMAT_VERSION = 1
FINGERPRINT_TOL = 0.05  # relative; rounding W to bf16 moves it by ~0.1%, to fp16 by ~0.02%
# fingerprint_distance estimates the relative weight change. Measured with bitsandbytes 0.50
# (scripts/fingerprint_quant.py: Gaussian, kaiming-uniform and Student-t weights, 64x64 to
# 512x1024, 5 seeds each), float vs quantized, median / max: int8 0.007 / 0.04, nf4 0.095 / 0.18,
# fp4 0.13 / 0.31 (heavy-tailed weights, 19% weight error); unrelated weights of the same shape
# 1.4 / min 0.55. 0.4 admits every 4-bit case seen with room for the estimate's noise (k = 8
# projections); a random unrelated weight falls below it about 3 times in 10,000. It cannot
# tell a base from a light fine-tune of it: quantization moves W more than such a tune does.
FINGERPRINT_TOL_QUANT = 0.4
STRICT_RESIDUALS = ("crop", "subtract")  # math depends on W: a mismatch is an error, not a warning


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not fit the model; the model was left unchanged."""


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the attached adapter to `path` (safetensors), atomically (temp file + rename).

    `model` may be wrapped (DDP, torch.compile, accelerate, FSDP2). In a distributed run only
    rank 0 writes: call save on rank 0 or on every rank; with FSDP2 every rank must call it (the
    sharded tensors are gathered). Raises AttachError when nothing is attached. Returns the path.
    """
    st = state(model)
    if st is None:
        raise AttachError("save: no lora-lite adapter is attached to this model (nothing to save)")
    tensors, targets = {}, {}
    for name, t in st.targets.items():
        for k in t.tensors:
            tensors[f"{name}.{k}"] = full(getattr(t.module, k)).detach().to("cpu").contiguous()
        targets[name] = {"hyperparameters": t.cfg.hyperparameters(), **t.info}
    meta = {
        "format_version": FORMAT_VERSION,
        "lora_lite_version": __version__,
        "spec_name": st.variant.NAME,
        "spec": spec_text(st.variant),
        "config": st.cfg.to_dict(),
        "targets": targets,
    }
    path = Path(path)
    if not is_writer():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"lora_lite": json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's lora_lite metadata. Raises CheckpointError if absent or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("lora_lite")
    except Exception as e:  # safetensors raises several types for a bad file
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if raw is None:
        raise CheckpointError(f"{path}: no lora_lite metadata (not saved by ll.save?)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: lora_lite metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        got = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: format_version {got!r}; this lora-lite reads {FORMAT_VERSION}")
    missing = [k for k in ("spec_name", "spec", "config", "targets") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {', '.join(missing)} (damaged or not saved by ll.save)")
    return meta


def load(model: nn.Module, path: str | os.PathLike, *, residual: str | None = None) -> nn.Module:
    """Attach the adapter saved at `path` to `model` (no calibration data needed); returns `model`.

    residual: None = as saved; "crop" or "subtract" switches a variant with a frozen part
    between the two (the same math: W_res x + adapter, or W x - frozen part + adapter), e.g.
    "subtract" to put an adapter trained with crop on a float base onto a 4/8-bit base.
    Checks, before changing anything: nothing attached yet; every saved target exists, is
    linear-like and has the saved weight shape; a quantized target is supported (no crop);
    saved tensors have the spec's shapes; the base weight's fingerprint matches within
    FINGERPRINT_TOL, or FINGERPRINT_TOL_QUANT when either side is quantized (an error for
    variants whose math depends on W, else a warning). Raises CheckpointError / AttachError
    naming the layer, ValueError for a residual the variant does not take.
    """
    wrapper, model = model, unwrap(model)
    if state(model) is not None:
        raise AttachError(f"load: model already has a {state(model).variant.NAME} adapter; call ll.detach(model) first")
    meta = read_metadata(path)
    gen = variant_from_text(meta["spec"], meta["spec_name"])
    cfg = gen.Config(**meta["config"])
    if residual is not None:
        cfg = dataclasses.replace(cfg, residual=residual)
    strict = cfg.residual in STRICT_RESIDUALS or getattr(gen, "USES_BASE_WEIGHT", False)
    modules = dict(model.named_modules())
    per_target = {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for name, tmeta in meta["targets"].items():
            m = modules.get(name)
            if m is None or not is_linear_like(m):
                raise CheckpointError(
                    f"{path}: target {name!r} is {'missing from' if m is None else 'not linear-like in'} this model"
                )
            d_in, d_out = layer_dims(m)
            shape = [d_out, d_in]
            if shape != [tmeta["d_out"], tmeta["d_in"]]:
                raise CheckpointError(
                    f"{path}: {name}: model layer is (d_out, d_in) = {tuple(shape)}, "
                    f"checkpoint expects {(tmeta['d_out'], tmeta['d_in'])}"
                )
            check_quantized(gen, cfg, name, m, fix="ll.load(model, path, residual='subtract')")
            check_tied(model, gen, cfg, name, m, fix="ll.load(model, path, residual='subtract')")
            cfg_t = gen.Config(**{**meta["config"], **tmeta["hyperparameters"], "residual": cfg.residual})
            want = gen.shapes(cfg_t, d_in, d_out)
            tensors = {}
            for k, shape_k in want.items():
                key = f"{name}.{k}"
                if key not in keys:
                    raise CheckpointError(f"{path}: tensor {key!r} is missing")
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(shape_k):
                    raise CheckpointError(f"{path}: {key} has shape {tuple(t.shape)}, spec expects {tuple(shape_k)}")
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise CheckpointError(f"{path}: {key} holds NaN/inf values (a diverged run?); refusing to load")
                tensors[k] = t
            info = target_info(m, base_weight(m))
            dist = fingerprint_distance(info["fingerprint"], tmeta["fingerprint"])
            tol = FINGERPRINT_TOL_QUANT if (info["quantization"] or tmeta.get("quantization")) else FINGERPRINT_TOL
            if dist > tol:
                msg = (
                    f"{path}: {name}: base weight differs from the one the adapter was trained on "
                    f"(fingerprint distance {dist:.2f} > {tol})"
                )
                if strict:
                    raise CheckpointError(msg + f"; {gen.NAME}'s math depends on W, refusing to load")
                warnings.warn(msg, stacklevel=2)
            info["loaded_from_quantization"] = tmeta.get("quantization")  # the base it was saved on
            info["loaded_fingerprint_distance"] = round(dist, 6)
            per_target[name] = (m, cfg_t, tensors, info)
    install(model, cfg, per_target)
    warn_if_wrapped_already(wrapper, "load")
    return wrapper
