"""Fold an attached adapter into the model's weights: ll.merge returns a plain model.

Every variant's change is linear in x for fixed adapter tensors, so each adapted layer is an
affine map x -> x W'^T + b'. merge reads W' and b' off the layer's own hooks: input hooks map
the identity I to X = H(I) (rows H(e_j)), output hooks F map Y = X W^T + b to F(X, Y), and
W'^T = F(I) - F(0), b' = F(0). An nn.Embedding is the same map on one-hot x: its hooks run on
every token id at once, y = W (rows W[j]), and return W'. No variant-specific code, so a new
spec merges too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .runtime import (
    AttachError,
    InputHook,
    OutputHook,
    detach,
    is_embedding,
    is_quantized,
    quantization,
    states,
    stored_layout,
    weight_sharers,
)
from .wrappers import full, shard_like, unwrap


def _ours(hooks: dict) -> list:
    return [h for h in hooks.values() if isinstance(h, (InputHook, OutputHook))]


@torch.no_grad()
def merged_weight(m: nn.Module, name: str) -> tuple[Tensor, Tensor | None]:
    """(W' (o, i), b' (o,) or None) in fp32 for one layer, as its lora-lite hooks compute it now.

    Runs the layer's hooks in their order on the identity (i, i) and on a zero row, with the
    base product done in fp32 (x W^T for x = I is W^T), so a bf16 W is rounded once, at the end.
    """
    if is_embedding(m):
        return merged_embedding(m), None
    W = stored_layout(m, full(m.weight).detach().float())  # (o, i) W, or W_res under residual crop
    bias = getattr(m, "bias", None)
    b = bias.detach().float() if bias is not None else torch.zeros(W.shape[0], device=W.device)  # (o,)
    X = torch.cat([torch.eye(W.shape[1], device=W.device), torch.zeros(1, W.shape[1], device=W.device)])  # (i + 1, i)
    Y = torch.cat([W.T, torch.zeros_like(W[:, :1]).T]) + b  # (i + 1, o) X W^T + b while X = [I; 0]
    for h in _ours(m._forward_pre_hooks):  # input-side adapters, in attach order
        new = h(m, (X,))
        if new is not None:
            X = new[0].float()
            Y = X @ W.T + b  # (i + 1, o)
    for h in _ours(m._forward_hooks):  # output-side adapters, each on the running output
        new = h(m, (X,), Y)
        Y = Y if new is None else new.float()
    b_new = Y[-1]  # (o,) the output at x = 0
    if bias is None and bool(b_new.abs().max() > 0):
        raise AttachError(f"merge: {name}: the adapter adds a bias but the layer has none")
    return (Y[:-1] - b_new).T, (b_new if bias is not None else None)  # (o, i)


@torch.no_grad()
def merged_embedding(m: nn.Module) -> Tensor:
    """W' (embedding_dim, num_embeddings) in fp32 for an nn.Embedding target, as its hooks compute it now.

    Runs the output hooks on every token id x = 0..num_embeddings-1 with y = W embed_scale (the
    layer's output for those ids, (num_embeddings, embedding_dim)), then divides embed_scale back
    out. LoRA gives W + s (B A)^T, DoRA m / ||W + s (B A)^T|| (W + s (B A)^T) per embedding dim.
    Source: PEFT peft/tuners/lora/layer.py, Embedding.merge and get_delta_weight.
    """
    W = full(m.weight).detach().float()  # (n, d) as stored
    es = getattr(m, "embed_scale", None)
    es = torch.as_tensor(1.0 if es is None else es, device=W.device).float()
    X = torch.arange(W.shape[0], device=W.device)  # (n,) every token id
    Y = W * es  # (n, d) the layer's output at X
    for h in _ours(m._forward_hooks):  # each adapter on the running output, in attach order
        new = h(m, (X,), Y)
        Y = Y if new is None else new.float()
    return (Y / es).T  # (d, n)


def merge(model: nn.Module) -> nn.Module:
    """Fold every attached adapter, at its current ll.scale and coeff, into weights and biases
    (several on one layer compose as their hooks do); detach them; return `model`, now a plain
    model with no lora-lite state, hooks or tensors.

    After merge, model(x) equals the adapted model(x) within fp32 rounding (about 1e-6 relative
    measured on the tiny test models; a bf16 W is rounded once, from fp32: no worse than PEFT's
    `merge_and_unload`, which adds a bf16-rounded delta in bf16). IA3 scales the bias too.
    `save_pretrained` / `from_pretrained` then round-trip like any model.
    An nn.Embedding target (lora, rslora, dora) merges too; one whose weight is tied to lm_head (or
    any other module) gets its own merged weight and the other keeps the base weight, so the
    logits stay the adapted model's, and `config.tie_word_embeddings` is set False (PEFT instead
    writes the shared weight, changing lm_head as well, with a warning). A linear target whose
    weight Parameter another module shares (another target, or a layer left alone) is untied the
    same way: each target gets its own merged weight.
    `model` may be wrapped (torch.compile, DDP, accelerate, FSDP2); Conv1D layers and a model
    moved with model.to(dtype) after attach merge too.
    Raises AttachError, leaving the model unchanged, when nothing is attached, when an adapter
    is inactive (ll.disabled, ll.set_active; named), when a finite weight would become NaN or
    inf (a broken adapter; PEFT's safe_merge), or when a target is a quantized layer:
    load the base in float (or dequantize it, e.g. transformers' `model.dequantize()`), attach or
    ll.load the adapter there, then merge.
    Source: PEFT's `merge_and_unload` (peft/tuners/tuners_utils.py), here computed from the
    hook itself rather than per-variant delta_weight formulas.
    """
    wrapper, model = model, unwrap(model) if isinstance(model, nn.Module) else model
    every = states(model)
    if not every:
        raise AttachError("merge: no lora-lite adapter is attached to this model (nothing to merge)")
    layers = {}
    for name, st in every.items():
        for tname, t in st.targets.items():
            if is_quantized(t.module):
                raise AttachError(
                    f"merge: {tname} is quantized ({quantization(t.module)}); merging would rewrite its quantized "
                    "weight. Load the base model in float (or dequantize it), ll.load the adapter there, then merge"
                )
            if not t.enabled:
                raise AttachError(
                    f"merge: adapter {name!r} is inactive at {tname} (ll.disabled or ll.set_active); "
                    f"activate it or ll.detach(model, name={name!r}) first"
                )
            layers[tname] = t.module
    new = {tname: merged_weight(m, tname) for tname, m in layers.items()}  # nothing changed yet
    for tname, (W, b) in new.items():  # PEFT's safe_merge: a broken adapter never reaches the weights
        base = [layers[tname].weight] + ([layers[tname].bias] if b is not None else [])
        cast = [x.to(ref.dtype) for x, ref in zip((W, b), base)]  # as written: fp16 overflows to inf
        if not all(bool(torch.isfinite(x).all()) for x in cast) and all(
            bool(torch.isfinite(full(x)).all()) for x in base
        ):
            raise AttachError(
                f"merge: {tname}: the merged weight would hold NaN or inf (the adapter's tensors or its output "
                f"are not finite, or exceed {base[0].dtype}); nothing merged, the model is unchanged"
            )
    tied = weight_sharers(model, layers)  # shared weights (a tied lm_head): each target gets its own
    detach(model)
    with torch.no_grad():
        for tname, (W, b) in new.items():
            m = layers[tname]
            W = shard_like(stored_layout(m, W).to(m.weight.dtype), m.weight)  # Conv1D, Embedding: stored (i, o)
            if tied.get(tname):  # untie: the other modules keep the base weight
                m.weight = nn.Parameter(W, requires_grad=m.weight.requires_grad)
                config = getattr(model, "config", None)
                if is_embedding(m) and getattr(config, "tie_word_embeddings", False):
                    config.tie_word_embeddings = False
            else:
                m.weight.copy_(W)
            if b is not None:
                m.bias.copy_(shard_like(b.to(m.bias.dtype), m.bias))
    return wrapper
