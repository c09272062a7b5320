"""Attach adapters to any model with plain forward hooks; detach gives the base model back.

The contract, in order (each step finishes before the next; nothing is modified until every
target's tensors are built, so a failure leaves the model as it was):

    attach(model, cfg, calibration_data=None)
      1. find targets: linear-like modules (in_features, out_features, weight; and transformers
         Conv1D, weight stored (d_in, d_out)) whose names match cfg.target_names (re.search)
         and cfg.layers; lm_head excluded; nn.Embedding (read as a Conv1D on one-hot x) when
         a pattern matches it (embed_tokens, wte, ...: when a pattern spells the name), refused
         unless the variant says EMBEDDING; a matching layer of another kind with a weight
         matrix (Conv2d, ...) or one inside a WEIGHT_READERS parent is refused; preflight:
         every check on the model and its targets (load runs it too)
      2. clamp rank hyperparameters per target to the dimension they need (min(d_in, d_out);
         HRA: d_in), alpha (DeLoRA: lambda0) scaled with r so alpha / r stays as configured (one warning each)
      3. calibrate on the *intact* model: input statistics of every target (padding excluded)
      4. build each target's tensors with the variant's init(W, cfg, stats), in fp32
      5. install: freeze every base parameter, register the tensors on the target (names
         start `lora_`; trainable ones as nn.Parameter, frozen ones as buffers), crop W to
         W_res = W - frozen_weight() when cfg.residual == "crop", register the hook; a
         failure here takes all of it back out
    cfg.residual == "subtract" leaves W untouched (the hook takes the frozen part out), which is
    what bitsandbytes 4/8-bit targets need: attach refuses crop on them before step 3.
    A hook returns the layer's new output (output hooks) or new input (input pre-hooks),
    never a delta; the input is cast to the adapter tensors' dtype (cfg.dtype until the model is
    moved with .to(dtype)) and the result back to the layer's dtype,
    except for variants whose module says CAST_INPUT = False (IA3: the gain is cast instead).

    detach(model)
      restores W (crop: W_res + frozen_weight(), within the weight dtype's rounding; otherwise W
      was never written), removes hooks and tensors, and restores every parameter's
      requires_grad: state_dict keys, values and flags are those before attach.

Quantized targets (bitsandbytes Linear4bit nf4/fp4, Linear8bitLt) keep their own forward and
their quantized weight; W is read only through base_weight (a dequantized fp32 copy, at init),
base_forward (x W^T by the layer's own forward) and base_row_sqnorm (row norms, cached for
them: dequantizing is costly; computed every call for float weights).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace

import torch
from torch import Tensor, nn

from .calibration import collect_input_stats
from .codegen.spec import SpecError
from .config import AdapterConfig, config_error
from .wrappers import full, is_sharded, shard_like, unwrap, wraps_data_parallel

STATE_ATTR = "_lora_lite"
NAMED_ATTR = "_lora_lite_named"  # {name: State} of the adapters attached with a name other than "default"
SLOT_PREFIX = "lora_lite_"  # a named adapter's tensors live on a child module <layer>.lora_lite_<name>
EXCLUDE = re.compile(r"(^|\.)(lm_head|embed_tokens|embed_out|wte|wpe|embeddings?)$")
EMBEDDING_RULE = ", and an embedding only when a pattern spells its name (embed_tokens)"
LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")


class AttachError(RuntimeError, ValueError):
    """attach/detach/load/set_coeff or calibration refused; the model was left unchanged.

    A RuntimeError (as it always was) and a ValueError (as bad calibration data and a variant's
    refusal of a layer were before they became AttachErrors), so either `except` catches it.
    """


@dataclass
class Target:
    """One adapted layer. `cfg` is its own config (rank clamped); set_coeff replaces it."""

    name: str
    module: nn.Module
    cfg: AdapterConfig
    tensors: tuple[str, ...]
    info: dict  # d_in, d_out, weight shape/dtype, quantization, fingerprint
    handle: object = None
    scale: float = 1.0  # ll.scale: y = y_base + scale (y_adapted - y_base); saved in checkpoints
    enabled: bool = True  # False inside ll.disabled or when set_active leaves it out
    host: nn.Module | None = None  # where its tensors live: None = the layer (the default adapter)
    state_dict_handles: tuple = ()  # crop: the state_dict hooks that present W, not W_res

    @property
    def holder(self) -> nn.Module:
        """The module the generated forward reads (`m.lora_A`): the layer, or a named adapter's slot."""
        return self.module if self.host is None else self.host


@dataclass
class State:
    """What attach installed. Holds no module objects or closures, so an adapted model can be
    deep-copied, pickled and torch.save'd (the copy's hooks point at the copy's state)."""

    cfg: AdapterConfig
    targets: dict[str, Target]
    requires_grad: dict[str, bool] = field(default_factory=dict)
    name: str = "default"

    @property
    def variant(self) -> ModuleType:
        """The generated module of the attached spec (resolved from the config's class)."""
        return self.cfg.variant()


def state(model: nn.Module, name: str = "default") -> State | None:
    """The state of the adapter attached as `name` (the default adapter unless named), or None.
    `model` may be wrapped (see lora_lite.wrappers). AttachError when it is not an nn.Module."""
    if not isinstance(model, nn.Module):
        raise AttachError(f"expected a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    if name == "default":
        return model.__dict__.get(STATE_ATTR)
    return model.__dict__.get(NAMED_ATTR, {}).get(name)


def states(model: nn.Module) -> dict[str, State]:
    """Every attached adapter's state by name, in attach order (the default adapter first).
    `model` may be wrapped. AttachError when it is not an nn.Module."""
    if not isinstance(model, nn.Module):
        raise AttachError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return _states_of(unwrap(model))


def _states_of(mod: nn.Module) -> dict[str, State]:
    d = mod.__dict__
    out = {"default": d[STATE_ATTR]} if isinstance(d.get(STATE_ATTR), State) else {}
    named = d.get(NAMED_ATTR)
    return out | ({k: v for k, v in named.items() if isinstance(v, State)} if isinstance(named, dict) else {})


class AdapterSlot(nn.Module):
    """Holds a named adapter's tensors on one layer (as the child `lora_lite_<name>`). Attribute
    reads it cannot answer go to the layer (weight, bias, in_features, ...), except `lora_*`
    names, so a generated forward(m, ...) reads a slot as it reads the layer itself."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.__dict__["layer"] = layer  # not a submodule: no cycle in modules() or state_dict

    def __getattr__(self, k: str):
        try:
            return super().__getattr__(k)
        except AttributeError:
            layer = self.__dict__.get("layer")
            if layer is None or k.startswith("lora_"):
                raise
            return getattr(layer, k)

    def forward(self, *args, **kwargs):  # base_forward calls m.forward on quantized layers
        return self.__dict__["layer"].forward(*args, **kwargs)


# Parents that read a child layer's weight without calling the child, so a hook on it never
# runs (nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward). A
# layer inside one of these is refused at attach. The one list; the README shows it.
WEIGHT_READERS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 family): y = x W + b with W stored (d_in, d_out), PEFT's
    fan_in_fan_out case. Recognised by name so transformers need not be imported; a named
    adapter's slot is read as its layer."""
    if isinstance(m, AdapterSlot):
        m = m.__dict__["layer"]
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), Tensor)


def is_embedding(m: nn.Module) -> bool:
    """An nn.Embedding (or a subclass): y = W[x] for token ids x, W stored (num_embeddings,
    embedding_dim). Read as a linear layer on one-hot x, d_in = num_embeddings, d_out =
    embedding_dim, W stored (d_in, d_out) as a Conv1D's: PEFT's lora_embedding_A (r, d_in) and
    lora_embedding_B (d_out, r) are then lora_A and lora_B. A named adapter's slot is read as its layer."""
    if isinstance(m, AdapterSlot):
        m = m.__dict__["layer"]
    return isinstance(m, nn.Embedding)


def stored_in_out(m: nn.Module) -> bool:
    """True when the layer stores W as (d_in, d_out): a Conv1D or an nn.Embedding."""
    return is_conv1d(m) or is_embedding(m)


def embedding_lookup(m: nn.Module, x: Tensor, A: Tensor) -> Tensor:
    """x A^T for an nn.Embedding target: the columns of A (r, num_embeddings) at token ids x
    (...,), as F.embedding with the layer's padding_idx and scale_grad_by_freq (no gradient
    reaches A's padding column), times the layer's `embed_scale` when it has one (Gemma-style
    scaled embeddings). Returns (..., r) in A's dtype. Source: PEFT peft/tuners/lora/layer.py,
    Embedding._embed and forward. max_norm is refused at attach (F.embedding would renormalise
    A's columns in place). A's gradient is dense even when the layer is sparse=True: a sparse
    gradient of A^T cannot be transposed back to A (PEFT's backward fails there)."""
    rows = nn.functional.embedding(
        x, A.T, padding_idx=m.padding_idx, scale_grad_by_freq=m.scale_grad_by_freq
    )  # (..., r)
    scale = getattr(m, "embed_scale", None)
    return rows if scale is None else rows * torch.as_tensor(scale).to(rows)


def layer_dims(m: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear-like layer, a Conv1D, or an nn.Embedding (num_embeddings, embedding_dim)."""
    if stored_in_out(m):
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
    """A (d_out, d_in) matrix laid out as the layer stores its weight ((d_in, d_out) for Conv1D and Embedding)."""
    return W.T if stored_in_out(m) else W


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
        if not name or isinstance(m, AdapterSlot):
            continue  # a named adapter's slot reads like its layer but is never a target
        matches = any(rx.search(name) for rx in regexes) and (cfg.layers is None or layer_index(name) in cfg.layers)
        if is_embedding(m):  # embed_tokens, wte, ...: only when a pattern spells the name, so '.' skips it
            last = name.rsplit(".", 1)[-1]
            if matches and (not EXCLUDE.search(name) or any(last in rx.pattern for rx in regexes)):
                found[name] = m  # preflight refuses it for a variant without EMBEDDING
            continue
        if EXCLUDE.search(name):
            continue
        if not is_linear_like(m):
            w = m._parameters.get("weight")
            if matches and isinstance(w, Tensor) and w.dim() >= 2:  # a weight matrix: not a container or a norm
                raise AttachError(
                    f"{gen.NAME}: {name} is a {type(m).__name__}; lora-lite adapts linear layers "
                    "(in_features, out_features, weight), transformers Conv1D and nn.Embedding only"
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
        why = f" ({excluded[0]} matches, but lm_head is never a target{EMBEDDING_RULE})" if excluded else ""
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
    Raises AttachError for a weight on the meta device and for an int8 layer that was never
    moved to a device (no SCB yet).
    """
    w = m.weight
    if w.is_meta:
        raise AttachError(f"a {type(m).__name__} weight {tuple(w.shape)} is on the meta device (not loaded)")
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
        if stored_in_out(m):
            return (x.to(w.dtype) @ w).float()  # W stored (i, o): Conv1D, Embedding
        return nn.functional.linear(x.to(w.dtype), w).float()
    bias = getattr(m, "bias", None)
    if bias is not None:
        x = x.to(bias.dtype)
    y = m.forward(x)
    if bias is not None:
        y = y - bias
    return y.float()


class _HadamardProduct(torch.autograd.Function):
    """s (w1_a w1_b) * (w2_a w2_b) that saves the four factors and recomputes the products in backward."""

    @staticmethod
    def forward(ctx, w1_a: Tensor, w1_b: Tensor, w2_a: Tensor, w2_b: Tensor, s: float) -> Tensor:
        ctx.save_for_backward(w1_a, w1_b, w2_a, w2_b)
        ctx.s = s
        return (w1_a @ w1_b).mul_(w2_a @ w2_b).mul_(s)  # (o, i); no autograd here, so in place

    @staticmethod
    def backward(ctx, grad: Tensor):
        w1_a, w1_b, w2_a, w2_b = ctx.saved_tensors
        g = grad * ctx.s  # (o, i)
        need = ctx.needs_input_grad
        d1_a = d1_b = d2_a = d2_b = None
        if need[0] or need[1]:  # d/d(w1_a w1_b) = g * (w2_a w2_b)
            g1 = g * (w2_a @ w2_b)  # (o, i)
            d1_a, d1_b = g1 @ w1_b.T, w1_a.T @ g1  # (o, r), (r, i)
        if need[2] or need[3]:  # d/d(w2_a w2_b) = g * (w1_a w1_b)
            g2 = g * (w1_a @ w1_b)  # (o, i)
            d2_a, d2_b = g2 @ w2_b.T, w2_a.T @ g2  # (o, r), (r, i)
        return d1_a, d1_b, d2_a, d2_b, None


def hadamard_product(w1_a: Tensor, w1_b: Tensor, w2_a: Tensor, w2_b: Tensor, s: float = 1.0) -> Tensor:
    """s (w1_a @ w1_b) * (w2_a @ w2_b), the dense LoHa update: (o, r), (r, i), (o, r), (r, i) -> (o, i).

    Autograd keeps only the four rank-r factors for backward and forms the two (o, i) products
    again there, instead of keeping both products (two (o, i) tensors per target for the whole
    step). Differentiable in every factor (not in s, a number); backward is built from plain
    torch ops, so it traces under torch.compile and can be differentiated again. Shapes must
    chain as matrix products (torch's matmul error otherwise). Source: FedPara (arXiv
    2108.06098), eq. 2; recomputation as PEFT peft/tuners/loha/layer.py, class HadaWeight.
    """
    return _HadamardProduct.apply(w1_a, w1_b, w2_a, w2_b, s)


class _KroneckerApply(torch.autograd.Function):
    """vec(s w1 X w2^T) of x that saves x and the three factors and recomputes the rest in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w2_a: Tensor, w2_b: Tensor, s: float) -> Tensor:
        ctx.save_for_backward(x, w1, w2_a, w2_b)
        ctx.s = s
        X = x.unflatten(-1, (w1.shape[1], w2_b.shape[1]))  # (..., m, n): x[c n + d] = X[c, d]
        h = (X @ w2_b.T) @ w2_a.T  # (..., m, r) -> (..., m, k): X w2^T
        return ((s * w1) @ h).flatten(-2)  # (..., l, k) -> (..., o): s w1 X w2^T, row-major

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w1, w2_a, w2_b = ctx.saved_tensors
        s, need = ctx.s, ctx.needs_input_grad
        dt = grad.dtype  # one dtype for every product (under autocast the forward ran in a lower one)
        for t in (x, w1, w2_a, w2_b):
            dt = torch.promote_types(dt, t.dtype)
        G = grad.to(dt).reshape(-1, w1.shape[0], w2_a.shape[0])  # (..., o) -> (T, l, k)
        X = x.to(dt).reshape(-1, w1.shape[1], w2_b.shape[1])  # (..., i) -> (T, m, n)
        w1, w2_a, w2_b = w1.to(dt), w2_a.to(dt), w2_b.to(dt)
        dx = dw1 = dw2_a = dw2_b = None
        if need[1] or need[2]:
            P = X @ w2_b.T  # (T, m, r)
            if need[1]:  # d/dw1 = s sum_T G h^T, h = P w2_a^T
                dw1 = s * torch.tensordot(G, P @ w2_a.T, dims=([0, 2], [0, 2]))  # (T, m, k) -> (l, m)
        if need[0] or need[2] or need[3]:
            dh = (s * w1).T @ G  # (T, m, k)
            if need[2]:  # d/dw2_a = sum_T dh^T P
                dw2_a = torch.tensordot(dh, P, dims=([0, 1], [0, 1]))  # (k, r)
            dP = dh @ w2_a  # (T, m, r)
            if need[3]:  # d/dw2_b = sum_T dP^T X
                dw2_b = torch.tensordot(dP, X, dims=([0, 1], [0, 1]))  # (r, n)
            if need[0]:
                dx = (dP @ w2_b).reshape(x.shape)  # (T, m, n) -> (..., i)
        return dx, dw1, dw2_a, dw2_b, None


def kronecker_apply(x: Tensor, w1: Tensor, w2_a: Tensor, w2_b: Tensor, s: float = 1.0) -> Tensor:
    """x (s w1 (x) (w2_a w2_b))^T without the Kronecker matrix, the LoKr update: (..., i) -> (..., o).

    w1 (l, m), w2_a (k, r), w2_b (r, n), x (..., i) with i = m n; the result is (..., o), o = l k:
    vec(s w1 X w2^T) with X = x read row-major as (..., m, n) and w2 = w2_a w2_b, three small
    products per token. Autograd keeps only x and the three factors for backward and forms the
    per-token products (X w2_b^T (..., m, r), X w2^T (..., m, k)) again there, instead of keeping
    them for the whole step. Differentiable in x and every factor (not in s, a number), any of
    which may be frozen; backward is built from plain torch ops in the widest dtype among its
    inputs, so it traces under torch.compile and can be differentiated again. A last dim of x
    other than m n raises torch's unflatten RuntimeError; factors that do not chain (w2_a's r
    against w2_b's) raise torch's matmul error. Source: LoKr, Yeh et al. (arXiv 2309.14859);
    dW = s w1 (x) w2 as PEFT peft/tuners/lokr/layer.py (which forms the (o, i) matrix).
    """
    return _KroneckerApply.apply(x, w1, w2_a, w2_b, s)


SQNORM_ATTR = "_lora_lite_row_sqnorm"  # module attribute: (weight key, ||W_i||^2), bitsandbytes only


def base_row_sqnorm(m: nn.Module) -> Tensor:
    """||W_i||^2 for each output row i of the base weight, (d_out,) fp32.

    Float W: computed on every call (one (o, i) reduction in fp32, small beside the layer's own
    (tokens, o, i) product), so it always follows the current weight, whatever wrote it
    (load_state_dict, copy_, `W.data` writes, dtype and device moves), and traces under
    torch.compile without a graph break. bitsandbytes W: dequantizing is costly, so the result
    is cached on the module (not a buffer: not in state_dict or checkpoints) until the weight
    changes as the cache can see: a new parameter, quant_state or storage (load_state_dict, a
    device move, bitsandbytes' CPU repacking) or an in-place write that autograd counts
    (`copy_` under no_grad). A write into `W.data` in place is not counted: call
    `refresh_row_norms(model)` after one. detach removes the cache.
    """
    if not is_quantized(m):
        return _row_sqnorm(m)
    w = m.weight
    if w.is_inference():  # made under torch.inference_mode: no version counter, nothing to key on
        return _row_sqnorm(m)
    qs = getattr(w, "quant_state", None)
    key = (id(w), w.data_ptr(), w._version, w.device, id(qs), getattr(qs, "dtype", None))
    cached = m.__dict__.get(SQNORM_ATTR)
    if cached is None or cached[0] != key:
        cached = (key, _row_sqnorm(m))
        m.__dict__[SQNORM_ATTR] = cached
    return cached[1]


def refresh_row_norms(model: nn.Module) -> int:
    """Drop the ||W_i||^2 that DoRA caches for bitsandbytes weights (recomputed on the next
    forward); needed only after writing a quantized weight's `.data` in place. Returns how many
    modules had one."""
    if not isinstance(model, nn.Module):
        raise AttachError(f"refresh_row_norms: expected a torch.nn.Module, got {type(model).__name__}")
    return sum(m.__dict__.pop(SQNORM_ATTR, None) is not None for m in unwrap(model).modules())


def _row_sqnorm(m: nn.Module) -> Tensor:
    if is_quantized(m):
        return base_weight(m).square().sum(1)  # (o,); the dequantized copy is freed here
    w = m.weight.detach()
    wide = torch.promote_types(w.dtype, torch.float32)  # fp32 (fp64 for an fp64 W)
    dim = 0 if stored_in_out(m) else 1  # a Conv1D or an Embedding stores W as (i, o)
    return torch.linalg.vector_norm(w, dim=dim, dtype=wide).square().float()  # (o,)


def check_quantized(gen: ModuleType, cfg: AdapterConfig, name: str, m: nn.Module, fix: str) -> None:
    """Refuse a bitsandbytes target the config cannot handle (before anything is modified).

    AttachError naming the layer: the spec declares quantized_base: false, or the residual is
    crop (it would rewrite the quantized weight); `fix` is the call that selects subtract.
    """
    if not is_quantized(m):
        return
    q = quantization(m)
    if not gen.QUANTIZED_BASE:
        raise AttachError(
            f"{gen.NAME}: {name} is quantized ({q}) and the spec declares quantized_base: false; use a float base"
        )
    if cfg.residual == "crop":
        raise AttachError(
            f"{gen.NAME}: {name} is quantized ({q}); residual crop would rewrite its weight. "
            f"Use residual='subtract' ({fix}), which leaves W untouched, or a float base"
        )


def check_model(model: nn.Module, op: str) -> None:
    """AttachError unless `model` is an nn.Module and torch.inference_mode is off: tensors made
    or written under it can never be trained, and a model's own weights or flags written there
    cannot be restored outside it."""
    if not isinstance(model, nn.Module):
        raise AttachError(f"{op}: expected a torch.nn.Module, got {type(model).__name__}")
    if torch.is_inference_mode_enabled():
        raise AttachError(f"{op}: refused under torch.inference_mode (its tensors cannot be trained); call it outside")


def preflight(
    model: nn.Module, cfg: AdapterConfig, targets: dict[str, nn.Module], op: str = "attach", name: str = "default"
) -> None:
    """Every check attach and load make on the model before changing anything (both call it,
    and install again); `name` is the adapter about to be attached.

    AttachError, one line naming the layer or tensor, for: a model that is not an nn.Module, or
    a call under torch.inference_mode; a name that is not an identifier, or one already attached;
    a parameter made under inference_mode (its flag could not be restored); a target whose
    weight is on the meta device; a target adapted through another module, or holding something
    (parameter, buffer, child module, attribute) with an adapter tensor's name (a PEFT-wrapped
    layer has a `lora_A` ModuleDict) or the new adapter's slot name; a quantized target the
    config cannot handle (check_quantized); under residual crop, a target another attached
    adapter already crops, or whose weight storage another parameter or buffer shares (tied
    weights, or two targets on one weight), since crop would rewrite both; lora-lite tensors or
    hooks (forward hooks, and a cropped target's state_dict hooks) anywhere in the model that no
    attached adapter (of any name) accounts for (left by a failed attach, a copied state, a
    half-detached copy). `model` may be wrapped (see lora_lite.wrappers).
    """
    check_model(model, op)
    model = unwrap(model)
    check_name(name)
    gen = cfg.variant()
    mine = states(model)
    if name in mine:
        what, how = ("", "model") if name == "default" else (f" named {name!r}", f"model, name={name!r}")
        raise AttachError(
            f"{op}: model already has a {mine[name].variant.NAME} adapter{what} attached; call ll.detach({how}) first, "
            f"or {op} this one under another name= (e.g. name='second')"
        )
    fix = f"ll.from_spec({gen.NAME!r}, residual='subtract')" if op == "attach" else f"ll.{op}(..., residual='subtract')"
    made_inference = next((n for n, p in model.named_parameters() if p.is_inference()), None)
    if made_inference is not None:
        raise AttachError(
            f"{op}: parameter {made_inference} was made under torch.inference_mode, so its requires_grad cannot be "
            "set back after detach; build the model outside inference_mode"
        )
    tensors, hooks = _accounted(model)
    stray = _stray(model, tensors, hooks)
    if stray:
        raise AttachError(
            f"{op}: {stray}, which no attached lora-lite adapter accounts for (left by a failed attach, "
            "a copied state, or an adapter on a model that contains this one); remove it or use a fresh model"
        )
    own_tensors, own_hooks = _accounted_by(mine.values())
    cropped = {id(t.module): n for n, st in mine.items() for t in st.targets.values() if t.cfg.residual == "crop"}
    for tname, m in targets.items():
        if is_embedding(m) and not gen.EMBEDDING:
            raise AttachError(
                f"{gen.NAME}: {tname} is an {type(m).__name__}; {gen.NAME} does not adapt embeddings "
                "(lora, rslora and dora do: basis none, core lowrank, as PEFT's LoRA, rsLoRA and DoRA)"
            )
        if is_embedding(m) and is_quantized(m):
            raise AttachError(
                f"{gen.NAME}: {tname} is a quantized ({quantization(m)}) {type(m).__name__}; lora-lite adapts "
                "float embeddings only"
            )
        if is_embedding(m) and m.max_norm is not None:
            raise AttachError(
                f"{gen.NAME}: {tname} is an {type(m).__name__} with max_norm={m.max_norm}, which renormalises "
                "looked-up rows in place; lora-lite adapts embeddings without max_norm"
            )
        dims = layer_dims(m)
        if not all(isinstance(d, int) and d > 0 for d in dims):
            what = "(num_embeddings, embedding_dim)" if is_embedding(m) else "(in_features, out_features)"
            raise AttachError(f"{gen.NAME}: {tname}: {what} = {dims}, expected positive integers")
        if m.weight.is_meta:
            raise AttachError(f"{gen.NAME}: {tname}: weight is on the meta device (not loaded); load the weights first")
        elsewhere = lambda key: key in tensors and key not in own_tensors  # noqa: E731
        ours = [k for k in (*m._parameters, *m._buffers) if k.startswith("lora_") and elsewhere((id(m), k))]
        if ours or any(id(h.target) in hooks and id(h.target) not in own_hooks for h in _hooks(m)):
            raise AttachError(
                f"{gen.NAME}: {tname} already has a lora-lite adapter ({', '.join(ours) or 'a hook'}), "
                "attached through another module; detach that one first"
            )
        taken = [k for k in gen.PARAMS if _has(m, k) and (id(m), k) not in own_tensors]
        if taken:
            raise AttachError(
                f"{gen.NAME}: {tname} already has {_kind(m, taken[0])} named {taken[0]!r} (a PEFT-wrapped layer?), "
                "which the adapter's tensor would replace; attach to the unwrapped model"
            )
        if name != "default" and _has(m, SLOT_PREFIX + name):
            raise AttachError(
                f"{gen.NAME}: {tname} already has {_kind(m, SLOT_PREFIX + name)} named {SLOT_PREFIX + name!r}, "
                f"where adapter {name!r} would keep its tensors; remove it or choose another name"
            )
        if cfg.residual == "crop" and id(m) in cropped:
            raise AttachError(
                f"{gen.NAME}: {tname} is already cropped by adapter {cropped[id(m)]!r}; a second crop would "
                f"mix their residuals: use residual='subtract' ({fix})"
            )
        check_quantized(gen, cfg, tname, m, fix=fix)
    if cfg.residual == "crop":
        _check_crop_weights(gen, model, targets, fix)


def _hooks(m: nn.Module) -> list:
    """The lora-lite hooks registered on a module: forward hooks and pre-hooks, and a cropped
    target's state_dict post-hook and load_state_dict pre-hook (each holds its Target)."""
    forward = [h for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()) if isinstance(h, OutputHook)]
    loading = (getattr(h, "hook", h) for h in m._load_state_dict_pre_hooks.values())  # torch wraps these
    weight = [h for h in (*m._state_dict_hooks.values(), *loading) if isinstance(h, (SaveFullWeight, CropLoadedWeight))]
    return forward + weight


def _has(m: nn.Module, k: str) -> bool:
    """True when module `m` has anything called `k`: parameter, buffer, child or attribute."""
    return k in m._parameters or k in m._buffers or k in m._modules or k in vars(m) or hasattr(type(m), k)


def _kind(m: nn.Module, k: str) -> str:
    if k in m._parameters:
        return "a parameter"
    if k in m._buffers:
        return "a buffer"
    if k in m._modules:
        return f"a child module ({type(m._modules[k]).__name__})"
    return "an attribute"


def _accounted(model: nn.Module) -> tuple[set, set]:
    """What attached adapters (of any name, on the model or any submodule) installed:
    {(id(module holding it), tensor name)} and {id(Target)} (each hook holds its Target)."""
    return _accounted_by(st for mod in model.modules() for st in _states_of(mod).values())


def _accounted_by(sts) -> tuple[set, set]:
    tensors, hooks = set(), set()
    for st in sts:
        for t in st.targets.values():
            tensors.update((id(t.holder), k) for k in t.tensors)
            hooks.add(id(t))
    return tensors, hooks


def _stray(model: nn.Module, tensors: set, hooks: set) -> str | None:
    """The first lora-lite tensor (a `lora_` parameter or buffer on a layer with a weight) or hook
    that no attached adapter accounts for, described; None when there is none."""
    for name, m in model.named_modules():
        where = name or "the model"
        if isinstance(getattr(m, "weight", None), Tensor):
            for k in (*m._parameters, *m._buffers):
                if k.startswith("lora_") and (id(m), k) not in tensors:
                    return f"{where} holds {k}"
        if any(id(h.target) not in hooks for h in _hooks(m)):
            return f"{where} has a lora-lite hook"
    return None


def _storage(t: Tensor) -> tuple:
    """Where a tensor's memory lives: equal for tensors that share storage (tied weights, views).
    A tensor subclass without a storage of its own (DTensor) is keyed by identity."""
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return ("object", id(t))


def weight_sharers(model: nn.Module, targets: dict[str, nn.Module]) -> dict[str, list[str]]:
    """For each target, the other parameters and buffers of `model` (by name) whose storage its
    weight shares: tied embeddings, a layer reused under two names, two targets on one weight.
    One pass over the model's tensors, whatever the number of targets."""
    owners: dict[tuple, list[str]] = {}
    for n, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        if t.numel():
            owners.setdefault(_storage(t), []).append(n)
    shared = {name: owners.get(_storage(m.weight), []) for name, m in targets.items()}
    return {name: [n for n in names if n != f"{name}.weight"] for name, names in shared.items()}


def _check_crop_weights(gen: ModuleType, model: nn.Module, targets: dict[str, nn.Module], fix: str) -> None:
    """Residual crop writes each target's weight in place: refuse a weight another parameter or
    buffer shares (weight_sharers)."""
    for name, others in weight_sharers(model, targets).items():
        if others:
            raise AttachError(
                f"{gen.NAME}: {name}.weight shares its storage with {others[0]}, so residual crop would rewrite "
                f"both; use residual='subtract' ({fix}), which leaves W untouched"
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
    (rank_limit). When `r` is clamped, each hyperparameter the math reads over r ** e (the
    module's PER_RANK: alpha / r, rsLoRA's alpha / sqrt(r), DeLoRA's lambda / r) is scaled by
    (r_clamped / r) ** e too, so the layer keeps the configured quotient, as PEFT (which never
    clamps) has it. Per-target
    hyperparameters are saved in checkpoints, so an adapter saved with another rule loads with
    the scaling it was trained with."""
    gen = cfg.variant()
    changes = {}
    for k in gen.RANKS:
        what, limit = rank_limit(gen, k, *layer_dims(m))
        if getattr(cfg, k) <= limit:
            continue
        changes[k] = limit
        note = ""
        for h, e in gen.PER_RANK.items() if k == "r" else ():
            changes[h] = getattr(cfg, h) * (limit / cfg.r) ** e
            per = "r" if e == 1 else f"r ** {e:g}"
            note += f" and {h}={changes[h]:g}, keeping {h} / {per} = {getattr(cfg, h) / cfg.r**e:g}"
        if warn:
            warnings.warn(
                f"{gen.NAME}: {name}: {k}={getattr(cfg, k)} exceeds {what}={limit}; "
                f"using {k}={limit}{note} for this layer",
                stacklevel=3,
            )
    return dataclasses.replace(cfg, **changes) if changes else cfg


# The largest adapter tensor attach builds, in entries: this many times the layer's own weight
# (plus 2**20). Shipped cores stay far below it (HRA's (d_in, r) is at most d_in / d_out times
# W); it stops a spec whose shapes would exhaust memory (a [65536, 65536] tensor on a 64 x 64 layer).
MAX_TENSOR_RATIO = 16


def _check_sizes(gen: ModuleType, name: str, want: dict, d_in: int, d_out: int) -> None:
    """AttachError, before anything is allocated, for an adapter tensor out of proportion to its layer."""
    limit = MAX_TENSOR_RATIO * d_in * d_out + 2**20
    for k, shape in want.items():
        n = math.prod(shape)
        if n > limit:
            raise AttachError(
                f"{gen.NAME}: {name}: {k} would have shape {tuple(shape)} ({n:,} entries), more than "
                f"{MAX_TENSOR_RATIO}x the layer's ({d_out}, {d_in}) weight; check the spec's shapes and hyperparameters"
            )


def _build(gen: ModuleType, name: str, m: nn.Module, cfg_t: AdapterConfig, stats: dict | None) -> dict:
    d_in, d_out = layer_dims(m)
    want = {k: v for k, v in gen.shapes(cfg_t, d_in, d_out).items() if k not in gen.SHARED}
    _check_sizes(gen, name, want, d_in, d_out)
    W = base_weight(m)  # (o, i); an embedding's (embedding_dim, num_embeddings)
    try:
        tensors = gen.init(W, cfg_t, stats, embedding=True) if is_embedding(m) else gen.init(W, cfg_t, stats)
    except torch.linalg.LinAlgError as e:  # an SVD/eigendecomposition failed: NaN/inf weights or statistics
        msg = str(e).splitlines()[0]
        finite = bool(torch.isfinite(W).all())
        raise AttachError(
            f"{gen.NAME}: {name}: {msg} (weight {'finite' if finite else 'has NaN/inf entries'})"
        ) from None
    except ValueError as e:  # a variant's init refuses this layer (odd HRA rank, too little data)
        raise AttachError(f"{gen.NAME}: {name}: {_first_line(e)}") from None
    except Exception as e:  # anything else a (user's) variant raises: name the layer, keep the cause
        raise AttachError(f"{gen.NAME}: {name}: init failed: {type(e).__name__}: {_first_line(e)}") from e
    if set(tensors) != set(want):
        raise AttachError(f"{gen.NAME}: {name}: init returned {sorted(tensors)}, spec declares {sorted(want)}")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(want[k]):
            raise AttachError(f"{gen.NAME}: {name}: {k} has shape {tuple(t.shape)}, spec says {tuple(want[k])}")
        if not torch.isfinite(t).all():
            raise AttachError(f"{gen.NAME}: {name}: {k} is not finite after init (check the weights/calibration)")
    return {"tensors": tensors, "info": target_info(m, W)}


def shared_shapes(gen: ModuleType, cfg: AdapterConfig, dims) -> tuple[int, int, dict]:
    """(d_in_max, d_out_max, {tensor: shape}) of the variant's SHARED tensors for targets of
    (d_in, d_out) `dims`: one tensor per adapter, sized by its largest target (VeRA's A, B)."""
    dims = list(dims)
    d_in, d_out = max(d for d, _ in dims), max(d for _, d in dims)
    return d_in, d_out, {k: v for k, v in gen.shapes(cfg, d_in, d_out).items() if k in gen.SHARED}


def build_shared(gen: ModuleType, cfg: AdapterConfig, targets: dict[str, nn.Module]) -> dict[str, Tensor]:
    """The variant's SHARED tensors for these targets ({} for most variants), fp32, checked
    (names, shapes, finite). AttachError naming the tensor otherwise; nothing is installed."""
    if not gen.SHARED:
        return {}
    d_in, d_out, want = shared_shapes(gen, cfg, (layer_dims(m) for m in targets.values()))
    try:
        tensors = gen.shared(cfg, d_in, d_out)
    except Exception as e:  # a (user's) variant's shared() failing: name it, keep the cause
        raise AttachError(f"{gen.NAME}: shared tensors: {type(e).__name__}: {_first_line(e)}") from e
    if set(tensors) != set(want):
        raise AttachError(f"{gen.NAME}: shared() returned {sorted(tensors)}, spec declares {sorted(want)}")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(want[k]) or not torch.isfinite(t).all():
            raise AttachError(f"{gen.NAME}: shared {k} has shape {tuple(t.shape)} (spec {want[k]}) or is not finite")
    return tensors


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


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


def attach(
    model: nn.Module, cfg: AdapterConfig, calibration_data=None, *, progress: bool = True, name: str = "default"
) -> nn.Module:
    """Attach the adapter `cfg` describes to every matching layer of `model`; returns `model`.

    calibration_data: iterable of batches (dicts of input_ids/attention_mask/..., tuples, or
    tensors) for data-driven bases; ignored by variants that need none. Every check runs before
    anything changes, and any refusal leaves the model exactly as it was: AttachError, one line
    naming the layer or value, for a model that is not an nn.Module or a cfg that is not a
    config, a name that is not an identifier, an adapter of that name already attached, no
    targets, everything `preflight` refuses (meta weights, PEFT-wrapped layers, tied weights
    under crop, a second crop on a cropped layer, stray lora-lite tensors or hooks,
    torch.inference_mode, crop on a quantized layer), missing or bad calibration data
    (calibration.collect_input_stats), and a variant's init refusing a layer. bitsandbytes
    4/8-bit targets work with every variant whose spec says quantized_base: true; a variant
    with a frozen part needs residual='subtract' on them.
    name: several adapters can be attached under different names (an identifier; "default"
    keeps today's layout: tensors on the layer itself). A named adapter's tensors live on a
    child `<layer>.lora_lite_<name>`; its hook runs after those attached before it (see the
    README's composition table). Calibration runs with the other adapters switched off.
    `model` may be wrapped (torch.compile, DDP, accelerate, FSDP2; see lora_lite.wrappers): the
    adapter goes on the model inside, and the wrapper is returned.
    """
    check_model(model, "attach")
    wrapper, model = model, unwrap(model)
    if not isinstance(cfg, AdapterConfig):
        raise AttachError(
            f"attach: expected a config from ll.from_spec(...) or ll.LoRAConfig(...), got {type(cfg).__name__}"
        )
    check_name(name)
    gen = cfg.variant()
    targets = find_targets(model, cfg)
    preflight(model, cfg, targets, op="attach", name=name)
    _warn_cpu_packed(model)
    cfgs = {}
    for tname, m in targets.items():  # a loop, not a comprehension: the clamp warning names attach's caller
        cfgs[tname] = target_config(cfg, tname, m)
    stats = None
    if gen.CALIBRATION == "required" and calibration_data is None:
        raise AttachError(f"{gen.NAME} needs calibration_data: pass ll.attach(model, cfg, calibration_data=batches)")
    if gen.CALIBRATION != "none" and calibration_data is not None:
        with all_off(model):  # statistics of the base model, not of the other adapters
            stats = collect_input_stats(model, targets, calibration_data, progress=progress, statistics=gen.STATISTICS)
    built = {n: _build(gen, n, m, cfgs[n], stats[n] if stats else None) for n, m in targets.items()}
    per_target = {n: (targets[n], cfgs[n], b["tensors"], b["info"]) for n, b in built.items()}
    install(model, cfg, per_target, op="attach", name=name, shared=build_shared(gen, cfg, targets))
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


def check_name(name: str) -> None:
    """An adapter name is an identifier (it becomes part of a module name); AttachError (a
    ValueError) otherwise."""
    if not isinstance(name, str) or not name.isidentifier() or len(name) > 64:
        raise AttachError(f"adapter name must be an identifier like 'math', got {_short_name(name)}")


@contextmanager
def all_off(model: nn.Module):
    """Every attached adapter switched off inside (each target's previous on/off back on exit)."""
    model = unwrap(model)
    targets = [t for st in states(model).values() for t in st.targets.values()]
    before = [t.enabled for t in targets]
    for t in targets:
        t.enabled = False
    try:
        yield
    finally:
        for t, on in zip(targets, before):
            t.enabled = on


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


def is_adapter_parameter(name: str) -> bool:
    """A parameter some lora-lite adapter registered (its last name part starts with `lora_`)."""
    return name.rsplit(".", 1)[-1].startswith("lora_")


def install(
    model: nn.Module,
    cfg: AdapterConfig,
    per_target: dict,
    op: str = "load",
    name: str = "default",
    shared: dict | None = None,
) -> State:
    """Register tensors, crop, add hooks (attach step 5; load uses it too); returns the State.

    per_target: {target name: (module, its config, {tensor name: tensor}, info)}. shared: the
    variant's SHARED tensors (VeRA's A, B), each made one frozen nn.Parameter registered on every
    target (one tensor in memory: a Parameter, unlike a buffer, stays one object through
    model.to(dtype or device)); a target lists them among its tensors. Runs
    `preflight` first (a second time for attach: it is cheap), then converts every tensor before
    touching the model, so running out of memory there changes nothing. Freezes the base (every
    parameter that is not another adapter's) and records its flags as they were before the first
    adapter (detach of the last adapter restores them). A failure after that (a variant's
    frozen_weight raising while cropping) takes everything back out: tensors, slots, hooks and
    requires_grad flags exactly, already cropped weights within the weight dtype's rounding (as
    detach does).
    """
    preflight(model, cfg, {tname: v[0] for tname, v in per_target.items()}, op=op, name=name)
    gen = cfg.variant()
    trainable = {k: spec[2] for k, spec in gen.PARAMS.items()}
    ready = {}
    for tname, (m, _, tensors, _) in per_target.items():
        device = m.weight.device if m.weight.device.type != "meta" else None
        # row-major like a loaded checkpoint (SVD factors come back column-major): same GEMMs, same bits
        ready[tname] = {
            k: t.detach().to(device=device, dtype=cfg.dtype).clone(memory_format=torch.contiguous_format)
            for k, t in tensors.items()
        }
    first = next(iter(per_target.values()))[0].weight.device
    one = {  # the shared tensors, once; frozen Parameters, on the first target's device
        k: nn.Parameter(
            t.detach().to(device=first if first.type != "meta" else None, dtype=cfg.dtype).contiguous().clone(),
            requires_grad=False,
        )
        for k, t in (shared or {}).items()
    }
    before = {n: p.requires_grad for n, p in model.named_parameters()}  # what a rollback restores
    base = {n: p for n, p in model.named_parameters() if not is_adapter_parameter(n)}
    earlier = list(states(model).values())
    flags = dict(earlier[0].requires_grad) if earlier else {n: p.requires_grad for n, p in base.items()}
    st = State(cfg=cfg, targets={}, requires_grad=flags, name=name)
    cropped: set[str] = set()
    try:
        for p in base.values():
            p.requires_grad_(False)
        for tname, (m, cfg_t, tensors, info) in per_target.items():
            target = Target(name=tname, module=m, cfg=cfg_t, tensors=(*tensors, *one), info=info)
            st.targets[tname] = target
            host = m
            if name != "default":
                host = AdapterSlot(m)
                m.add_module(SLOT_PREFIX + name, host)
                target.host = host
            for k, t in ready[tname].items():
                if trainable[k]:
                    host.register_parameter(k, nn.Parameter(t))
                else:
                    host.register_buffer(k, t)
            for k, p in one.items():
                host.register_parameter(k, p)  # the same Parameter on every target
            if cfg_t.residual == "crop":
                add_to_weight(m, -gen.frozen_weight(host, cfg_t))
                cropped.add(tname)
                target.state_dict_handles = (
                    m.register_state_dict_post_hook(SaveFullWeight(target)),
                    m.register_load_state_dict_pre_hook(CropLoadedWeight(target)),
                )
            target.handle = _register_hook(gen, target)
    except BaseException:
        _uninstall(model, st, cropped, before)
        raise
    if name == "default":
        model.__dict__[STATE_ATTR] = st
    else:
        model.__dict__.setdefault(NAMED_ATTR, {})[name] = st
    return st


def _uninstall(model: nn.Module, st: State, cropped, flags: dict | None) -> None:
    """Take out what install put in: hooks, W restored for the targets in `cropped` (W_res +
    frozen_weight(), within the weight dtype's rounding), tensors (a named adapter's slot),
    the State; then the requires_grad `flags` (None: leave every flag as it is)."""
    gen = st.variant
    for t in st.targets.values():
        m = t.module
        if t.handle is not None:
            t.handle.remove()
        for h in t.state_dict_handles:
            h.remove()
        if t.name in cropped:
            add_to_weight(m, gen.frozen_weight(t.holder, t.cfg))
        if t.host is None:
            for k in t.tensors:
                m._parameters.pop(k, None)
                m._buffers.pop(k, None)
        elif m._modules.get(SLOT_PREFIX + st.name) is t.host:
            del m._modules[SLOT_PREFIX + st.name]
        m.__dict__.pop(SQNORM_ATTR, None)
    if flags is not None:
        params = dict(model.named_parameters())
        for n, flag in flags.items():
            if n in params:
                params[n].requires_grad_(flag)
    if st.name == "default":
        if model.__dict__.get(STATE_ATTR) is st:
            del model.__dict__[STATE_ATTR]
    else:
        named = model.__dict__.get(NAMED_ATTR, {})
        if named.get(st.name) is st:
            del named[st.name]
        if not named:
            model.__dict__.pop(NAMED_ATTR, None)


class OutputHook:
    """Forward hook: y -> forward(m, x, y, cfg) of the target's generated module.

    A class rather than a closure so an adapted model pickles and deep-copies. It casts x to
    the adapter dtype unless the module says CAST_INPUT = False (its forward works in the
    layer's dtype or never reads x; IA3 casts its gain instead). The adapter dtype is read
    from the target's first adapter tensor at every call, not from cfg.dtype, so the hooks
    follow `model.to(torch.bfloat16)`, `.half()` or `.to(device)` after attach."""

    def __init__(self, target: Target):
        self.target = target

    def adapter_dtype(self) -> torch.dtype:
        return getattr(self.target.holder, self.target.tensors[0]).dtype

    def __call__(self, m, args, y):
        t = self.target
        cfg, v = t.cfg, (t.scale if t.enabled else 0.0)
        if v == 0.0 and cfg.residual != "crop":
            return None  # the layer's own output: the base model's, bit for bit
        gen = cfg.variant()
        x = args[0]
        if gen.CAST_INPUT and x.is_floating_point():  # an embedding's token ids stay integers
            x = x.to(self.adapter_dtype())
        if v == 1.0:
            return gen.forward(t.holder, x, y, cfg)
        return scaled_output(gen, t.holder, x, y, cfg, v)


def scaled_output(gen: ModuleType, m: nn.Module, x: Tensor, y: Tensor, cfg: AdapterConfig, v: float) -> Tensor:
    """y_base + v (y_adapted - y_base), (..., o) in y's dtype; v = 0 is the base layer (ll.scale).

    Crop: y = x W_res^T lacks the frozen part; forward on a zero y in crop mode gives the frozen part
    plus the change, in subtract mode the change alone, both in factored form (no (o, i) matrix),
    so y_base is the base output within the rounding of the frozen part. A cropped variant whose
    forward reads W (USES_BASE_WEIGHT: DoRA's magnitude on PiSSA or AntiPaSTO, not linear in y)
    adds the frozen part back as x frozen_weight()^T instead ((o, i) formed, fp32; only while
    scaled or disabled). Otherwise y is y_base.
    """
    if cfg.residual == "crop" and gen.USES_BASE_WEIGHT:
        frozen = gen.frozen_weight(m, cfg)  # (o, i) fp32, the part W_res lacks
        y_base = y.float() + x.float() @ frozen.T  # (..., o)
        adapted = gen.forward(m, x, y, cfg).float() if v != 0.0 else y_base  # (..., o)
        return (y_base + v * (adapted - y_base)).to(y.dtype)
    if cfg.residual == "crop":
        zero = torch.zeros_like(y)
        whole = gen.forward(m, x, zero, cfg).float()  # (..., o) frozen part + change
        change = gen.forward(m, x, zero, dataclasses.replace(cfg, residual="subtract")).float()  # (..., o)
        return (y.float() + whole - (1.0 - v) * change).to(y.dtype)
    adapted = gen.forward(m, x, y, cfg).float()  # (..., o)
    return (y.float() + v * (adapted - y.float())).to(y.dtype)


class InputHook(OutputHook):
    """Forward pre-hook: x -> forward(m, x, cfg), cast back to x's dtype; with ll.scale v,
    x -> x + v (forward(x) - x), so v = 0 (or ll.disabled) leaves the input untouched."""

    def __call__(self, m, args):
        t = self.target
        cfg, v = t.cfg, (t.scale if t.enabled else 0.0)
        if v == 0.0:
            return None
        gen, m = cfg.variant(), t.holder
        x = args[0]
        if gen.CAST_INPUT:
            new = gen.forward(m, x.to(self.adapter_dtype()), cfg).to(x.dtype)
        else:
            new = gen.forward(m, x, cfg)
        if v != 1.0:
            new = (x.float() + v * (new.float() - x.float())).to(x.dtype)  # (..., i)
        return (new, *args[1:])


class SaveFullWeight:
    """state_dict post-hook of a cropped target: the saved `weight` is W = W_res + frozen part
    (within the weight dtype's rounding), never the cropped W_res, so `model.state_dict()`,
    `save_pretrained` and whole-model checkpoints hold the base weight. The adapter's own
    tensors are saved beside it under their `lora_` names (a named adapter's under its slot)."""

    def __init__(self, target: Target):
        self.target = target

    def __call__(self, m, state_dict, prefix, local_metadata):
        key, t = prefix + "weight", self.target
        if key not in state_dict:
            return
        gone = [k for k in t.tensors if k not in t.holder._parameters and k not in t.holder._buffers]
        if gone:  # removed by hand: W cannot be rebuilt (detach refuses too); say what is saved
            warnings.warn(
                f"state_dict: {t.name} lacks {gone[0]}, so its weight is saved cropped (W_res, not the base W); "
                "put it back, or ll.load the adapter's checkpoint into a fresh model",
                stacklevel=2,
            )
            return
        frozen = t.cfg.variant().frozen_weight(t.holder, t.cfg)  # (o, i) fp32
        state_dict[key] = shifted(state_dict[key], stored_layout(m, frozen))


class CropLoadedWeight:
    """load_state_dict pre-hook of a cropped target: an incoming `weight` is a base W (what
    SaveFullWeight writes), cropped to W - frozen part before it is copied in; the frozen part
    comes from the incoming adapter tensors when the state_dict has them, else the module's."""

    def __init__(self, target: Target):
        self.target = target

    def __call__(self, m, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "weight"
        if key in state_dict:
            t = self.target
            slot = "" if t.host is None else next(k for k, c in m._modules.items() if c is t.host) + "."
            given = {k: state_dict.get(prefix + slot + k, getattr(t.holder, k)) for k in t.tensors}
            frozen = t.cfg.variant().frozen_weight(SimpleNamespace(**given), t.cfg)
            state_dict[key] = shifted(state_dict[key], -stored_layout(m, frozen))


def shifted(w: Tensor, delta: Tensor) -> Tensor:
    """A new tensor w + delta in w's dtype and layout (sharded or not); delta fp32, shaped as w."""
    return shard_like((full(w).detach().float() + delta.to(w.device)).to(w.dtype), w)


def add_to_weight(m: nn.Module, delta: Tensor) -> None:
    """W <- W + delta for a float layer, delta (d_out, d_in) fp32, rounded once to W's dtype.

    Crop (delta = -frozen_weight) and detach (+frozen_weight) go through here; an
    FSDP2-sharded W is gathered and each rank keeps its shard (every rank must call).
    """
    with torch.no_grad():
        m.weight.copy_(shifted(m.weight, stored_layout(m, delta)))


def _register_hook(gen: ModuleType, target: Target):
    if gen.HOOK == "output":
        return target.module.register_forward_hook(OutputHook(target))
    # a later adapter wraps the layer as it was: its new input is made first (PEFT's W H_1 H_2 for HRA)
    prepend = any(isinstance(h, InputHook) for h in target.module._forward_pre_hooks.values())
    return target.module.register_forward_pre_hook(InputHook(target), prepend=prepend)


def detach(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove the adapter `name` (None: every adapter, the last attached first) and give the base
    model back (see the module docstring); returns `model`. The base's requires_grad flags come
    back when the last adapter goes.

    Checks first, changes nothing on refusal: AttachError when `model` is not an nn.Module,
    under torch.inference_mode, when nothing (or no adapter `name`) is attached, or when a
    cropping target lacks a tensor its W needs back (removed by hand after attach).
    """
    check_model(model, "detach")
    wrapper, model = model, unwrap(model)
    every = states(model)
    if not every:
        raise AttachError("detach: no lora-lite adapter is attached to this model")
    if name is not None and name not in every:
        raise AttachError(f"detach: no adapter named {_short_name(name)} (attached: {list(every)})")
    order = list(reversed(every)) if name is None else [name]
    for n in order:
        for t in every[n].targets.values():
            if t.cfg.residual != "crop":
                continue
            gone = [k for k in t.tensors if k not in t.holder._parameters and k not in t.holder._buffers]
            if gone:
                raise AttachError(
                    f"detach: {t.name} lacks {gone[0]}, which restoring its cropped weight needs; "
                    "put it back (or ll.load the adapter's checkpoint into a fresh model)"
                )
    for n in order:
        st, last = every[n], len(states(model)) == 1
        cropped = {t.name for t in st.targets.values() if t.cfg.residual == "crop"}
        # the last adapter gives back the base's flags from before the first attach
        _uninstall(model, st, cropped, st.requires_grad if last else None)
    return wrapper


def set_active(model: nn.Module, names: str | list[str]) -> None:
    """Make exactly the adapters `names` active (a str or a list; [] switches all off); the
    others stay attached, their hooks passing the base through. ll.disabled nests with it.

    Raises AttachError naming an adapter that is not attached, or for `names` that is not a
    str or a list of str (nothing is changed then). `model` may be wrapped.
    """
    every = states(model)
    if isinstance(names, str):
        want = [names]
    elif isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        want = list(names)
    else:
        raise AttachError(f"set_active: expected an adapter name or a list of names, got {_short_name(names)}")
    unknown = [n for n in want if n not in every]
    if unknown:
        raise AttachError(f"set_active: no adapter named {_short_name(unknown[0])} (attached: {list(every)})")
    for n, st in every.items():
        for t in st.targets.values():
            t.enabled = n in want


def _short_name(name) -> str:
    """repr of a user-given adapter name, cut to one short line."""
    text = repr(name)
    return text if len(text) <= 60 else text[:57] + "..."


def set_coeff(model: nn.Module, value: float, name: str = "default") -> None:
    """Change the `coeff` knob of the adapter `name` without re-attaching (0 = identity).

    Raises AttachError when `model` is not an nn.Module, nothing (or no adapter `name`) is
    attached or the variant has no `coeff`; SpecError (a ValueError) for a value that is not a
    finite number within the spec's bounds. Nothing changes on refusal. Allowed under
    torch.inference_mode (no tensor changes: the hooks read the new value on their next call).
    """
    if not isinstance(model, nn.Module):
        raise AttachError(f"set_coeff: expected a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    st = state(model, name) if isinstance(name, str) else None
    if st is None:
        what = (
            "no lora-lite adapter is attached"
            if name == "default"
            else f"no adapter named {_short_name(name)} is attached"
        )
        raise AttachError(f"set_coeff: {what} to this model")
    if "coeff" not in st.variant.RUNTIME_KNOBS:
        raise AttachError(
            f"set_coeff: {st.variant.NAME} has no runtime 'coeff' knob "
            f"(its knobs: {list(st.variant.RUNTIME_KNOBS) or 'none'})"
        )
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < math.inf
    if not finite or (isinstance(value, int) and abs(value) > 2**1023):  # float() would overflow
        raise config_error(f"set_coeff: coeff must be a finite number, got {repr(value)[:40]}")
    try:  # the config checks the spec's bounds; build every new config before assigning any
        cfg = dataclasses.replace(st.cfg, coeff=float(value))
        per_target = {tname: dataclasses.replace(t.cfg, coeff=float(value)) for tname, t in st.targets.items()}
    except SpecError as e:
        raise config_error(f"set_coeff: {_first_line(e)}") from None
    st.cfg = cfg
    for tname, t in st.targets.items():
        t.cfg = per_target[tname]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimiser should train: those with requires_grad (of the model or a wrapper).

    AttachError when `model` is not an nn.Module."""
    if not isinstance(model, nn.Module):
        raise AttachError(f"trainable_parameters: expected a torch.nn.Module, got {type(model).__name__}")
    return [p for p in unwrap(model).parameters() if p.requires_grad]
