"""Attach adapters to any model with plain forward hooks; detach gives the base model back.

The contract, in order (each step finishes before the next; nothing is modified until every
target's tensors are built, so a failure leaves the model as it was):

    attach(model, cfg, calibration_data=None)
      1. find targets: linear-like modules (in_features, out_features, weight; and transformers
         Conv1D, weight stored (d_in, d_out)) whose names match cfg.target_names (re.search)
         and cfg.layers; lm_head and embeddings excluded; a matching layer of another kind
         with a weight matrix (Conv2d, an Embedding under another name, ...) or one inside a
         WEIGHT_READERS parent is refused
      2. clamp rank hyperparameters per target to the dimension they need (min(d_in, d_out);
         HRA: d_in), alpha scaled with r so alpha / r stays as configured (one warning each)
      3. calibrate on the *intact* model: input statistics of every target (padding excluded)
      4. build each target's tensors with the variant's init(W, cfg, stats), in fp32
      5. install: freeze every base parameter, register the tensors on the target (names
         start `lora_`; trainable ones as nn.Parameter, frozen ones as buffers), crop W to
         W_res = W - frozen_weight() when cfg.residual == "crop", register the hook
    cfg.residual == "subtract" leaves W untouched (the hook takes the frozen part out), which is
    what bitsandbytes 4/8-bit targets need: attach refuses crop on them before step 3.
    A hook returns the layer's new output (output hooks) or new input (input pre-hooks),
    never a delta; the input is cast to cfg.dtype and the result back to the layer's dtype,
    except for variants whose module says CAST_INPUT = False (IA3: the gain is cast instead).

    detach(model)
      restores W (crop: W_res + frozen_weight(), within the weight dtype's rounding; otherwise W
      was never written), removes hooks and tensors, and restores every parameter's
      requires_grad: state_dict keys, values and flags are those before attach.

Quantized targets (bitsandbytes Linear4bit nf4/fp4, Linear8bitLt) keep their own forward and
their quantized weight; W is read only through base_weight (a dequantized fp32 copy, at init),
base_forward (x W^T by the layer's own forward) and base_row_sqnorm (cached row norms, as
for float weights).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace

import torch
from torch import Tensor, nn

from .calibration import collect_input_stats
from .config import AdapterConfig
from .wrappers import full, is_sharded, shard_like, unwrap, wraps_data_parallel

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
    state_dict_handles: tuple = ()  # crop: the state_dict hooks that present W, not W_res


@dataclass
class State:
    """What attach installed. Holds no module objects or closures, so an adapted model can be
    deep-copied, pickled and torch.save'd (the copy's hooks point at the copy's state)."""

    cfg: AdapterConfig
    targets: dict[str, Target]
    requires_grad: dict[str, bool] = field(default_factory=dict)

    @property
    def variant(self) -> ModuleType:
        """The generated module of the attached spec (resolved from the config's class)."""
        return self.cfg.variant()


def state(model: nn.Module) -> State | None:
    """The attached adapter's state, or None. `model` may be wrapped (see lora_lite.wrappers)."""
    return unwrap(model).__dict__.get(STATE_ATTR)


# Parents that read a child layer's weight without calling the child, so a hook on it never
# runs (nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward). A
# layer inside one of these is refused at attach. The one list; the README shows it.
WEIGHT_READERS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 family): y = x W + b with W stored (d_in, d_out), PEFT's
    fan_in_fan_out case. Recognised by name so transformers need not be imported."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), Tensor)


def layer_dims(m: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear-like layer or a Conv1D."""
    if is_conv1d(m):
        d_in, d_out = m.weight.shape  # stored (in, out)
        return int(d_in), int(d_out)
    return m.in_features, m.out_features


def is_linear_like(m: nn.Module) -> bool:
    """A layer lora-lite adapts: in_features, out_features and a weight tensor (nn.Linear and
    bitsandbytes' Linear4bit/Linear8bitLt), or a transformers Conv1D."""
    return is_conv1d(m) or (
        all(hasattr(m, a) for a in ("in_features", "out_features", "weight"))
        and isinstance(getattr(m, "weight", None), Tensor)
    )


def stored_layout(m: nn.Module, W: Tensor) -> Tensor:
    """A (d_out, d_in) matrix laid out as the layer stores its weight ((d_in, d_out) for Conv1D)."""
    return W.T if is_conv1d(m) else W


def layer_index(name: str) -> int | None:
    """Block index read from a module name (`model.layers.3.self_attn.q_proj` -> 3)."""
    m = LAYER_INDEX.search("." + name + ".")
    return int(m.group(1)) if m else None


def find_targets(model: nn.Module, cfg: AdapterConfig) -> dict[str, nn.Module]:
    """Modules the config adapts, by name. AttachError when none match (lists candidates)."""
    gen = cfg.variant()
    patterns = cfg.target_names or gen.TARGET_NAMES
    regexes = []
    for p in patterns:
        try:
            regexes.append(re.compile(p))
        except re.error as e:
            raise AttachError(f"{gen.NAME}: target_names: bad regex {p!r}: {e}") from None
    found, linear = {}, []
    readers = {
        f"{p}.{c}" if p else c: type(pm).__name__
        for p, pm in model.named_modules()
        if isinstance(pm, WEIGHT_READERS)
        for c, _ in pm.named_children()
    }
    for name, m in model.named_modules():
        if not name or EXCLUDE.search(name):
            continue
        matches = any(rx.search(name) for rx in regexes) and (cfg.layers is None or layer_index(name) in cfg.layers)
        if not is_linear_like(m):
            w = m._parameters.get("weight")
            if matches and isinstance(w, Tensor) and w.dim() >= 2:  # a weight matrix: not a container or a norm
                raise AttachError(
                    f"{gen.NAME}: {name} is a {type(m).__name__}; lora-lite adapts linear layers "
                    "(in_features, out_features, weight) and transformers Conv1D only"
                )
            continue
        linear.append(name)
        if not matches:
            continue
        if name in readers:
            raise AttachError(
                f"{gen.NAME}: {name} ({type(m).__name__}) is inside a {readers[name]}, which reads its weight "
                "without calling it, so an adapter hook would never run"
            )
        found[name] = m
    if not found:
        sample = ", ".join(linear[:8]) + (" ..." if len(linear) > 8 else "") or "(none)"
        excluded = [
            n for n, m in model.named_modules() if n and EXCLUDE.search(n) and any(r.search(n) for r in regexes)
        ]
        why = f" ({excluded[0]} matches, but lm_head and embeddings are never targets)" if excluded else ""
        raise AttachError(
            f"{gen.NAME}: no linear layer matches target_names={list(patterns)} "
            f"layers={cfg.layers}{why}; linear layers here: {sample}"
        )
    return found


def is_quantized(m: nn.Module) -> bool:
    """True for bitsandbytes 4/8-bit layers (and anything whose weight is not floating point)."""
    return not m.weight.dtype.is_floating_point or type(m.weight).__name__ in ("Params4bit", "Int8Params")


def quantization(m: nn.Module) -> str | None:
    """How a layer's weight is stored: "nf4", "fp4" (bitsandbytes Linear4bit), "int8"
    (Linear8bitLt), the weight's dtype name for other non-float weights, None for float ones."""
    if not is_quantized(m):
        return None
    w = m.weight
    if type(w).__name__ == "Params4bit":
        qs = getattr(w, "quant_state", None)
        return str(getattr(qs, "quant_type", None) or getattr(w, "quant_type", "4bit"))
    if type(w).__name__ == "Int8Params" or w.dtype == torch.int8:
        return "int8"
    return str(w.dtype).removeprefix("torch.")


def _dequantize_cpu_packed_4bit(data: Tensor, qs) -> Tensor:
    """W (N, K) fp32 from bitsandbytes' CPU layout for AVX512-BF16 kernels.

    bitsandbytes 0.50 repacks a Linear4bit on the first eval-mode, no-grad CPU forward
    (modules._convert_weight_packed_for_cpu): `data` becomes (N, K/2) uint8 with the 4-bit
    codes of 32-row tiles interleaved, and `qs.absmax` (K / blocksize, N) bf16, unnested. The
    code table `qs.code` (16,) is unchanged. This inverts the layout only (the reshapes of its
    _convert_weight_packed_for_cpu_inverse, which also rewrites quant_state in place).
    """
    N, K = qs.shape
    packed = data.reshape(-1, 32)  # rows of 32 low nibbles | 32 high nibbles
    codes = torch.cat([packed & 0xF, packed >> 4], dim=-1)  # (N K / 64, 64)
    codes = codes.reshape(N // 32, K // 2, 32, 2).transpose(1, 2).reshape(N, K)  # (N, K)
    scale = qs.absmax.float().T.repeat_interleave(qs.blocksize, dim=1)  # (N, K)
    return qs.code.float()[codes.long()] * scale


def base_weight(m: nn.Module) -> Tensor:
    """The layer's weight as fp32 (d_out, d_in), dequantized for bitsandbytes layers.

    Linear4bit (nf4/fp4, nested statistics or not) goes through
    bitsandbytes.functional.dequantize_4bit, or _dequantize_cpu_packed_4bit once bitsandbytes
    has repacked it for CPU inference; Linear8bitLt is int8 * SCB / 127 per row,
    SCB read from the weight or, after the layer's first forward, from `m.state`. A new tensor:
    callers that keep only a statistic let it go (no dequantized copy stays alive).
    Raises AttachError for an int8 layer that was never moved to a device (no SCB yet).
    """
    w = m.weight
    if type(w).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        qs = w.quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            return _dequantize_cpu_packed_4bit(w.data, qs)
        return bnbf.dequantize_4bit(w.data, qs).float()
    if type(w).__name__ == "Int8Params" or w.dtype == torch.int8:
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(m.state, "SCB", None) if hasattr(m, "state") else None
        if scb is None:
            raise AttachError("int8 layer without quantization statistics (SCB): move it to its device first")
        return w.data.float() * (scb.float()[:, None] / 127.0)
    return stored_layout(m, full(w).detach().float())  # (o, i); an FSDP2-sharded W is gathered


def base_forward(m: nn.Module, x: Tensor) -> Tensor:
    """x W^T for the layer's base weight, without its bias or any hook: (..., i) -> (..., o) fp32.

    Float layers: x cast to the weight's dtype and multiplied as the layer's own forward would
    (no fp32 copy of W; in bf16 the product is bf16-rounded). bitsandbytes layers: the layer's
    own dequantizing forward (`m.forward`, which skips the module's forward hooks, ours
    included), with its bias subtracted, so W is never copied out; x is cast to the bias dtype
    first (bitsandbytes casts the bias to the input's dtype in place). DoRA uses it on A's rows.
    """
    if not is_quantized(m):
        w = m.weight.detach()
        if is_conv1d(m):
            return (x.to(w.dtype) @ w).float()  # W stored (i, o)
        return nn.functional.linear(x.to(w.dtype), w).float()
    bias = getattr(m, "bias", None)
    if bias is not None:
        x = x.to(bias.dtype)
    y = m.forward(x)
    if bias is not None:
        y = y - bias
    return y.float()


SQNORM_ATTR = "_lora_lite_row_sqnorm"  # module attribute holding (weight key, ||W_i||^2)


def base_row_sqnorm(m: nn.Module) -> Tensor:
    """||W_i||^2 for each output row i of the base weight, (d_out,) fp32.

    Computed once (from a float W in fp32; from one dequantization of a bitsandbytes W), then
    cached on the module (not a buffer: not in state_dict or checkpoints) until the weight
    changes: a new parameter, new storage (a device or dtype move, bitsandbytes' CPU
    repacking) or an in-place write that autograd counts (an optimizer step, `copy_`/`mul_`
    under no_grad, load_state_dict). A write through `w.data` bypasses that count: assign a new
    parameter instead, or drop the cache (`m.__dict__.pop(SQNORM_ATTR)`). detach removes it.
    A weight made under torch.inference_mode has no such count: it is read on every call.
    """
    w = m.weight
    if w.is_inference():  # made under torch.inference_mode: no version counter, nothing to key on
        return _row_sqnorm(m)
    key = (id(w), w.data_ptr(), w._version, w.device, w.dtype, id(getattr(w, "quant_state", None)))
    cached = m.__dict__.get(SQNORM_ATTR)
    if cached is None or cached[0] != key:
        cached = (key, _row_sqnorm(m))
        m.__dict__[SQNORM_ATTR] = cached
    return cached[1]


def _row_sqnorm(m: nn.Module) -> Tensor:
    if is_quantized(m):
        return base_weight(m).square().sum(1)  # (o,); the dequantized copy is freed here
    w = m.weight.detach()
    wide = torch.promote_types(w.dtype, torch.float32)  # fp32 (fp64 for an fp64 W)
    dim = 0 if is_conv1d(m) else 1  # a Conv1D stores W as (i, o)
    return torch.linalg.vector_norm(w, dim=dim, dtype=wide).square().float()  # (o,)


def check_quantized(gen: ModuleType, cfg: AdapterConfig, name: str, m: nn.Module, fix: str) -> None:
    """Refuse a bitsandbytes target the config cannot handle (before anything is modified).

    AttachError naming the layer: the spec declares quantized_base: false, or the residual is
    crop (it would rewrite the quantized weight); `fix` is the call that selects subtract.
    """
    if not is_quantized(m):
        return
    q = quantization(m)
    if not getattr(gen, "QUANTIZED_BASE", False):
        raise AttachError(
            f"{gen.NAME}: {name} is quantized ({q}) and the spec declares quantized_base: false; use a float base"
        )
    if cfg.residual == "crop":
        raise AttachError(
            f"{gen.NAME}: {name} is quantized ({q}); residual crop would rewrite its weight. "
            f"Use residual='subtract' ({fix}), which leaves W untouched, or a float base"
        )


def check_tied(model: nn.Module, gen: ModuleType, cfg: AdapterConfig, name: str, m: nn.Module, fix: str) -> None:
    """Refuse crop on a weight the model shares with another module (a tied embedding /
    lm_head): cropping it would change the other one too. AttachError naming both."""
    if cfg.residual != "crop":
        return
    owners = [n for n, p in model.named_parameters(remove_duplicate=False) if p is m.weight]
    others = [n for n in owners if n != f"{name}.weight"]
    if others:
        raise AttachError(
            f"{gen.NAME}: {name}.weight is tied to {others[0]}; residual crop would change both. "
            f"Use residual='subtract' ({fix})"
        )


def weight_fingerprint(W: Tensor, k: int = 8) -> list[float]:
    """A cheap identity check of a weight (o, i): [||W||_F, k projections u_j^T W v_j * sqrt(o i)].

    u_j, v_j are fixed unit vectors (seed 0), so each projection has about the scale of the
    norm, and fingerprint_distance estimates the relative weight change: two unrelated random
    weights are ~1.4 apart, bf16 rounding ~0.001, int8 ~0.01, nf4 ~0.1, fp4 ~0.13
    (scripts/fingerprint_quant.py).
    """
    o, i = W.shape
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(k, o, generator=g), dim=1).to(W.device)
    v = torch.nn.functional.normalize(torch.randn(k, i, generator=g), dim=1).to(W.device)
    proj = ((u @ W.float()) * v).sum(1) * math.sqrt(o * i)  # (k,)
    return [float(W.float().norm())] + [float(p) for p in proj]


def fingerprint_distance(a: list[float], b: list[float]) -> float:
    """Distance between two fingerprints, an estimate of ||W_a - W_b||_F / ||W_b||_F.

    ||a - b|| / (sqrt(k) ||W_b||): each projection of a change E has variance ||E||_F^2, so this
    is the RMS of the k projection changes relative to b's weight norm (entry 0), plus the
    norm's own change. With k = 8 it is noisy: ~0.6x to ~1.4x the true relative distance for
    99% of draws; unrelated weights of the same shape and scale land near 1.4, rarely below 0.5.
    """
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((ta - tb).norm() / (math.sqrt(len(b) - 1) * tb[0].abs().clamp_min(1e-30)))


def rank_limit(gen: ModuleType, k: str, d_in: int, d_out: int) -> tuple[str, int]:
    """The largest value rank hyperparameter `k` can take on a (d_in, d_out) layer, and its
    name: the smallest layer dimension that `k` shares a tensor shape with in the spec's PARAMS
    (HRA's u (d_in, r): d_in; LoRA's A (r, d_in) and B (d_out, r): min(d_in, d_out))."""
    dims = {"d_in": d_in, "d_out": d_out}
    paired = sorted({d for shape, _, _ in gen.PARAMS.values() if k in shape for d in shape if d in dims})
    if len(paired) == 1:
        return paired[0], dims[paired[0]]
    return "min(d_in, d_out)", min(d_in, d_out)


def target_config(cfg: AdapterConfig, name: str, m: nn.Module, warn: bool = True) -> AdapterConfig:
    """The config for one target: rank hyperparameters clamped to the dimension they need
    (rank_limit). When `r` is clamped and the spec has `alpha` (scale alpha / r), alpha is
    scaled by r_clamped / r too, so the layer keeps the configured alpha / r, as PEFT (which
    never clamps) scales it. Per-target hyperparameters are saved in checkpoints, so an adapter
    saved with another rule loads with the scaling it was trained with."""
    gen = cfg.variant()
    changes = {}
    for k in gen.RANKS:
        what, limit = rank_limit(gen, k, *layer_dims(m))
        if getattr(cfg, k) <= limit:
            continue
        changes[k] = limit
        note = ""
        if k == "r" and "alpha" in gen.BOUNDS:
            changes["alpha"] = cfg.alpha * limit / cfg.r
            note = f" and alpha={changes['alpha']:g}, keeping alpha / r = {cfg.alpha / cfg.r:g}"
        if warn:
            warnings.warn(
                f"{gen.NAME}: {name}: {k}={getattr(cfg, k)} exceeds {what}={limit}; "
                f"using {k}={limit}{note} for this layer",
                stacklevel=3,
            )
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _build(gen: ModuleType, name: str, m: nn.Module, cfg_t: AdapterConfig, stats: dict | None) -> dict:
    W = base_weight(m)
    try:
        tensors = gen.init(W, cfg_t, stats)
    except ValueError as e:  # a variant's init refuses this layer (odd HRA rank, too little data)
        raise ValueError(f"{gen.NAME}: {name}: {e}") from None
    except torch.linalg.LinAlgError as e:  # an SVD/eigendecomposition failed: NaN/inf weights or statistics
        msg = str(e).splitlines()[0]
        finite = bool(torch.isfinite(W).all())
        raise AttachError(
            f"{gen.NAME}: {name}: {msg} (weight {'finite' if finite else 'has NaN/inf entries'})"
        ) from None
    want = gen.shapes(cfg_t, *layer_dims(m))
    if set(tensors) != set(want):
        raise AttachError(f"{gen.NAME}: {name}: init returned {sorted(tensors)}, spec declares {sorted(want)}")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(want[k]):
            raise AttachError(f"{gen.NAME}: {name}: {k} has shape {tuple(t.shape)}, spec says {tuple(want[k])}")
        if not torch.isfinite(t).all():
            raise AttachError(f"{gen.NAME}: {name}: {k} is not finite after init (check the weights/calibration)")
    return {"tensors": tensors, "info": target_info(m, W)}


def target_info(m: nn.Module, W: Tensor) -> dict:
    """What a checkpoint records of a target's base layer; W is its dequantized fp32 weight."""
    return {
        "d_in": layer_dims(m)[0],
        "d_out": layer_dims(m)[1],
        "weight_shape": list(W.shape),  # (d_out, d_in), also for 4-bit weights stored packed
        "weight_dtype": str(m.weight.dtype).removeprefix("torch."),
        "quantization": quantization(m),  # None, "nf4", "fp4", "int8"
        "fingerprint": weight_fingerprint(W),  # of the dequantized weight, before any crop
    }


def attach(model: nn.Module, cfg: AdapterConfig, calibration_data=None, *, progress: bool = True) -> nn.Module:
    """Attach the adapter `cfg` describes to every matching layer of `model`; returns `model`.

    calibration_data: iterable of batches (dicts of input_ids/attention_mask/..., tuples, or
    tensors) for data-driven bases; ignored by variants that need none. Raises AttachError
    (already attached, no targets, missing calibration data, crop on a quantized layer) or
    ValueError (bad calibration data) and leaves the model unchanged. bitsandbytes 4/8-bit
    targets work with every variant whose spec says quantized_base: true; a variant with a
    frozen part needs residual='subtract' on them (crop is refused, naming the layer).
    """
    if not isinstance(cfg, AdapterConfig):
        raise TypeError(
            f"attach: expected a config from ll.from_spec(...) or ll.LoRAConfig(...), got {type(cfg).__name__}"
        )
    wrapper, model = model, unwrap(model)
    if state(model) is not None:
        raise AttachError(
            f"model already has a {state(model).variant.NAME} adapter attached; call ll.detach(model) first"
        )
    gen = cfg.variant()
    targets = find_targets(model, cfg)
    for name, m in targets.items():
        taken = [k for k in (*m._parameters, *m._buffers) if k.startswith("lora_")]
        hooked = any(isinstance(h, OutputHook) for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))
        if taken or hooked:
            raise AttachError(
                f"{gen.NAME}: {name} already has a lora-lite adapter ({', '.join(taken) or 'a hook'}), "
                "attached through another module; detach that one first"
            )
        check_quantized(gen, cfg, name, m, fix=f"ll.from_spec({gen.NAME!r}, residual='subtract')")
        check_tied(model, gen, cfg, name, m, fix=f"ll.from_spec({gen.NAME!r}, residual='subtract')")
    _warn_cpu_packed(model)
    cfgs = {name: target_config(cfg, name, m) for name, m in targets.items()}
    stats = None
    if gen.CALIBRATION == "required" and calibration_data is None:
        raise AttachError(f"{gen.NAME} needs calibration_data: pass ll.attach(model, cfg, calibration_data=batches)")
    if gen.CALIBRATION != "none" and calibration_data is not None:
        stats = collect_input_stats(model, targets, calibration_data, progress=progress)
    built = {name: _build(gen, name, m, cfgs[name], stats[name] if stats else None) for name, m in targets.items()}
    install(model, cfg, {name: (targets[name], cfgs[name], b["tensors"], b["info"]) for name, b in built.items()})
    warn_if_wrapped_already(wrapper, "attach")
    return wrapper


def warn_if_wrapped_already(wrapper: nn.Module, what: str) -> None:
    """Warn when the adapter went into a model that DDP or FSDP2 had already wrapped: they
    synchronise only the parameters they saw when built, so training would let ranks drift."""
    model = unwrap(wrapper)
    if wraps_data_parallel(wrapper) or any(is_sharded(p) for p in model.parameters()):
        warnings.warn(
            f"{what}: the model was already wrapped for data parallelism (DDP/FSDP2), which does not "
            "synchronise the adapter's new parameters; fine for inference, but to train, "
            f"{what} before wrapping",
            stacklevel=3,
        )


def _warn_cpu_packed(model: nn.Module) -> None:
    """Warn when bitsandbytes has repacked 4-bit layers for CPU inference (see base_weight):
    in bitsandbytes 0.50 such a layer's forward has no backward, so no gradient reaches the
    adapters before it. It happens on the first eval-mode, no-grad CPU forward on AVX512-BF16
    machines; setting `support_avx512bf16_for_cpu = False` on each Linear4bit prevents it."""
    packed = [
        n
        for n, m in model.named_modules()
        if getattr(getattr(m, "weight", None), "quant_state", None) is not None
        and getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    ]
    if packed:
        warnings.warn(
            f"{len(packed)} bitsandbytes 4-bit layers ({packed[0]}, ...) were repacked for CPU inference "
            "(an eval-mode forward on an AVX512-BF16 CPU); bitsandbytes gives them no backward, so "
            "training cannot reach adapters before them. Reload the model and set "
            "support_avx512bf16_for_cpu = False on its Linear4bit layers before evaluating",
            stacklevel=3,
        )


def install(model: nn.Module, cfg: AdapterConfig, per_target: dict) -> State:
    """Register tensors, crop, add hooks (attach step 5; load uses it too). No input checks here."""
    gen = cfg.variant()
    st = State(cfg=cfg, targets={}, requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = {name: spec[2] for name, spec in gen.PARAMS.items()}
    for name, (m, cfg_t, tensors, info) in per_target.items():
        device = m.weight.device if m.weight.device.type != "meta" else None
        for k, t in tensors.items():
            # row-major like a loaded checkpoint (SVD factors come back column-major): same GEMMs, same bits
            t = t.detach().to(device=device, dtype=cfg.dtype).clone(memory_format=torch.contiguous_format)
            if trainable[k]:
                m.register_parameter(k, nn.Parameter(t))
            else:
                m.register_buffer(k, t)
        target = Target(name=name, module=m, cfg=cfg_t, tensors=tuple(tensors), info=info)
        if cfg_t.residual == "crop":
            add_to_weight(m, -gen.frozen_weight(m, cfg_t))
            target.state_dict_handles = (
                m.register_state_dict_post_hook(SaveFullWeight(target)),
                m.register_load_state_dict_pre_hook(CropLoadedWeight(target)),
            )
        target.handle = _register_hook(gen, target)
        st.targets[name] = target
    model.__dict__[STATE_ATTR] = st
    return st


class OutputHook:
    """Forward hook: y -> forward(m, x, y, cfg) of the target's generated module.

    A class rather than a closure so an adapted model pickles and deep-copies. It casts x to
    the adapter dtype unless the module says CAST_INPUT = False (its forward works in the
    layer's dtype or never reads x; IA3 casts its gain instead). The adapter dtype is read
    from the target's first adapter tensor at every call, not from cfg.dtype, so the hooks
    follow `model.to(torch.bfloat16)`, `.half()` or `.to(device)` after attach."""

    def __init__(self, target: Target):
        self.target = target

    def adapter_dtype(self, m: nn.Module) -> torch.dtype:
        return getattr(m, self.target.tensors[0]).dtype

    def __call__(self, m, args, y):
        cfg = self.target.cfg
        gen = cfg.variant()
        x = args[0].to(self.adapter_dtype(m)) if gen.CAST_INPUT else args[0]
        return gen.forward(m, x, y, cfg)


class InputHook(OutputHook):
    """Forward pre-hook: x -> forward(m, x, cfg), cast back to x's dtype."""

    def __call__(self, m, args):
        cfg = self.target.cfg
        gen = cfg.variant()
        x = args[0]
        if not gen.CAST_INPUT:
            return (gen.forward(m, x, cfg), *args[1:])
        return (gen.forward(m, x.to(self.adapter_dtype(m)), cfg).to(x.dtype), *args[1:])


class SaveFullWeight:
    """state_dict post-hook of a cropped target: the saved `weight` is W = W_res + frozen part
    (within the weight dtype's rounding), never the cropped W_res, so `model.state_dict()`,
    `save_pretrained` and whole-model checkpoints hold the base weight. The adapter's own
    tensors are saved beside it under their `lora_` names."""

    def __init__(self, target: Target):
        self.target = target

    def __call__(self, m, state_dict, prefix, local_metadata):
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            frozen = self.target.cfg.variant().frozen_weight(m, self.target.cfg)  # (o, i) fp32
            state_dict[key] = shifted(w, stored_layout(m, frozen))


class CropLoadedWeight:
    """load_state_dict pre-hook of a cropped target: an incoming `weight` is a base W (what
    SaveFullWeight writes), cropped to W - frozen part before it is copied in; the frozen part
    comes from the incoming adapter tensors when the state_dict has them, else the module's."""

    def __init__(self, target: Target):
        self.target = target

    def __call__(self, m, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "weight"
        if key in state_dict:
            given = {k: state_dict.get(prefix + k, getattr(m, k)) for k in self.target.tensors}
            frozen = self.target.cfg.variant().frozen_weight(SimpleNamespace(**given), self.target.cfg)
            state_dict[key] = shifted(state_dict[key], -stored_layout(m, frozen))


def shifted(w: Tensor, delta: Tensor) -> Tensor:
    """A new tensor w + delta in w's dtype and layout (sharded or not); delta fp32, shaped as w."""
    return shard_like((full(w).detach().float() + delta.to(w.device)).to(w.dtype), w)


def _register_hook(gen: ModuleType, target: Target):
    if gen.HOOK == "output":
        return target.module.register_forward_hook(OutputHook(target))
    return target.module.register_forward_pre_hook(InputHook(target))


def add_to_weight(m: nn.Module, delta: Tensor) -> None:
    """W <- W + delta for a float layer, delta (d_out, d_in) fp32, rounded once to W's dtype.

    Crop (delta = -frozen_weight) and detach (+frozen_weight) go through here; an
    FSDP2-sharded W is gathered and each rank keeps its shard (every rank must call).
    """
    with torch.no_grad():
        m.weight.copy_(shifted(m.weight, stored_layout(m, delta)))


def detach(model: nn.Module) -> nn.Module:
    """Remove the adapter and give the base model back (see the module docstring); returns `model`.

    Raises AttachError when nothing is attached.
    """
    wrapper, model = model, unwrap(model)
    st = state(model)
    if st is None:
        raise AttachError("detach: no lora-lite adapter is attached to this model")
    gen = st.variant
    for t in st.targets.values():
        m = t.module
        t.handle.remove()
        for h in t.state_dict_handles:
            h.remove()
        if t.cfg.residual == "crop":
            add_to_weight(m, gen.frozen_weight(m, t.cfg))
        for k in t.tensors:
            m._parameters.pop(k, None)
            m._buffers.pop(k, None)
        m.__dict__.pop(SQNORM_ATTR, None)
    params = dict(model.named_parameters())
    for n, flag in st.requires_grad.items():
        if n in params:
            params[n].requires_grad_(flag)
    del model.__dict__[STATE_ATTR]
    return wrapper


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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"set_coeff: coeff must be a finite number, got {value!r}")
    st.cfg = dataclasses.replace(st.cfg, coeff=float(value))
    for t in st.targets.values():
        t.cfg = dataclasses.replace(t.cfg, coeff=float(value))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimiser should train: those with requires_grad (of the model or a wrapper)."""
    return [p for p in unwrap(model).parameters() if p.requires_grad]
