"""Input statistics of target layers, gathered on the intact model before anything changes.

    collect_input_stats(model, targets, batches, statistics=("second_moment",))
        -> {name: {"second_moment": (i, i), "mean": (i,), "tokens": n, ...}}

second_moment = mean over counted tokens of x x^T (fp32), the statistic the data-driven bases
need: upstream CorDA's covariance C, Wanda's per-direction rms (v^T C v); with `mean` it gives
the centred covariance whose top eigenvectors are EVA's PCA directions.
sequence_second_moment = mean over sequences s of X_s^T X_s / |max X_s|^2, X_s the (T_s, i)
counted inputs of one sequence (one row of the batch) divided by its largest value: the
covariance of PEFT's CorDA (peft/tuners/lora/corda.py, from CorDA's reference code), computed
only when asked for, with "sequences", their count. Counted tokens: those with attention_mask 1
and, when the batch has `labels` of the same shape, labels != -100 (the positions a loss
ignores, as PEFT's EVA `use_label_mask`).

Every refusal is an AttachError (from lora_lite.runtime; also a ValueError, as these errors
were before), one line naming the batch or layer: calibration data that is not an iterable of
batches, or is empty; a batch of another type, with no tokens, with input_ids that are not
integers or lie outside the model's vocabulary (checked against the input embedding before the
batch runs), or with an attention_mask of another shape or with values other than 0/1; a model
that raises on a batch; non-finite activations. The model comes back as it was, each
submodule in its own train/eval mode, without the hooks calibration added.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


def _error(msg: str) -> Exception:
    from .runtime import AttachError  # runtime imports this module

    return AttachError(f"calibration: {msg}")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding: `get_input_embeddings()` (Hugging Face models) or
    else its first nn.Embedding; None when it has none (token ids are then not checked)."""
    emb = None
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except Exception:  # NotImplementedError in models without one
            emb = None
    if not isinstance(emb, nn.Embedding):
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return emb.num_embeddings if emb is not None else None


def check_batch(batch, i: int, vocab: int | None) -> None:
    """Refuse (AttachError naming batch `i`) what would fail inside the model or count wrong tokens:
    another type, no tokens, input_ids that are not integers or outside [0, vocab), an
    attention_mask of another shape than input_ids or with values other than 0/1."""
    if isinstance(batch, Mapping):
        if not all(isinstance(k, str) for k in batch):
            raise _error(f"batch {i}: keys must be strings (model(**batch)), got {sorted(map(repr, batch))}")
        tensors = {k: v for k, v in batch.items() if isinstance(v, Tensor)}
        if not tensors:
            raise _error(f"batch {i}: no tensors in {sorted(batch)}")
        ids = batch.get("input_ids")
        if ids is not None:
            _check_ids(ids, f"batch {i}: input_ids", vocab)
        labels = batch.get("labels")
        if isinstance(ids, Tensor) and isinstance(labels, Tensor) and labels.dim() == ids.dim():
            if labels.shape != ids.shape:  # per-token labels (a (B,) label per sequence is left alone)
                raise _error(f"batch {i}: labels has shape {tuple(labels.shape)}, input_ids {tuple(ids.shape)}")
        mask = batch.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, Tensor):
                raise _error(f"batch {i}: attention_mask is a {type(mask).__name__}, expected a tensor")
            if isinstance(ids, Tensor) and mask.shape != ids.shape:
                raise _error(f"batch {i}: attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
            if mask.is_floating_point() or mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                raise _error(f"batch {i}: attention_mask must hold 0/1 integers or bools (dtype {mask.dtype})")
        if any(v.numel() == 0 for v in tensors.values()):
            raise _error(f"batch {i}: {next(k for k, v in tensors.items() if v.numel() == 0)} is empty")
        return
    if isinstance(batch, (tuple, list)):
        if not batch or not isinstance(batch[0], Tensor):
            raise _error(f"batch {i}: a tuple batch must start with a tensor (model(*batch))")
        first = batch[0]
    elif isinstance(batch, Tensor):
        first = batch
    else:
        raise _error(
            f"batch {i} is a {type(batch).__name__}: expected a dict "
            "(input_ids, attention_mask, ...), a tuple of tensors, or a tensor"
        )
    if first.numel() == 0:
        raise _error(f"batch {i}: empty tensor of shape {tuple(first.shape)}")
    if not first.is_floating_point() and not first.is_complex():
        _check_ids(first, f"batch {i}: token ids", vocab)


def _check_ids(ids, what: str, vocab: int | None) -> None:
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise _error(f"{what} must be an integer tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.numel() == 0:
        raise _error(f"{what} is empty (shape {tuple(ids.shape)})")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        bad = lo if lo < 0 else hi
        raise _error(f"{what} holds {bad}, outside the vocabulary [0, {vocab if vocab is not None else 'inf'})")


def _call(model: nn.Module, batch, device) -> Tensor | None:
    """Run one calibration batch; return its padding mask (B, T) or None."""
    if isinstance(batch, Mapping):
        kwargs = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items() if k != "labels"}
        model(**kwargs)
        return kwargs.get("attention_mask")
    if isinstance(batch, (tuple, list)):
        args = [b.to(device) if isinstance(b, Tensor) else b for b in batch]
        model(*args)
        return None
    if isinstance(batch, Tensor):
        model(batch.to(device))
        return None
    raise _error(f"batch of type {type(batch).__name__}")  # check_batch refuses it first


# The (i, i) statistics collect_input_stats can gather; a variant's STATISTICS names those its init reads.
STATISTICS = ("second_moment", "sequence_second_moment")
IGNORE_INDEX = -100  # the label value losses skip (PyTorch cross_entropy's default ignore_index)


def _token_mask(batch, device) -> Tensor | None:
    """(B, T) mask of the tokens to count: attention_mask, and labels != -100 when given."""
    if isinstance(batch, (tuple, list)):
        # model(*batch): a second item shaped like the first and holding only 0/1 is the
        # attention mask (HF models take it as their second positional argument)
        if len(batch) >= 2 and all(isinstance(b, Tensor) for b in batch[:2]) and batch[0].shape == batch[1].shape:
            if bool(((batch[1] == 0) | (batch[1] == 1)).all()):
                return batch[1].to(device)
        return None
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if isinstance(labels, Tensor) and "input_ids" in batch and labels.shape == batch["input_ids"].shape:
        keep = labels != IGNORE_INDEX
        mask = keep if mask is None else mask.bool() & keep
    return None if mask is None else mask.to(device)


def collect_input_stats(
    model: nn.Module,
    targets: dict[str, nn.Module],
    batches: Iterable,
    progress: bool = True,
    statistics: tuple[str, ...] = ("second_moment",),
) -> dict[str, dict]:
    """Statistics of each target's input over `batches` (padding excluded); model unchanged.

    Always "mean" (i,) and "tokens"; the (i, i) `statistics` asked for (a variant's STATISTICS):
    "second_moment", "sequence_second_moment" (with "sequences"). Each batch is checked
    (check_batch) before it runs. Raises AttachError (see the module docstring): an empty or
    non-iterable `batches`, a bad batch, the model raising on one, non-finite activations, no
    counted tokens at a layer, a sequence whose largest input is 0 (sequence_second_moment
    divides by it), naming the layer. Every submodule's own train/eval mode is restored and the
    hooks it adds are removed, also when it raises.
    """
    unknown = sorted(set(statistics) - set(STATISTICS))
    if unknown:
        raise _error(f"unknown statistic {unknown[0]!r} (known: {', '.join(STATISTICS)})")
    if isinstance(batches, (Tensor, Mapping)):
        batches = [batches]
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise _error(f"calibration_data is a {type(batches).__name__}: expected an iterable of batches")
    vocab = vocab_size(model)
    sums = {name: 0.0 for name in targets}
    seq_sums = {name: 0.0 for name in targets}  # sum over sequences of X_s^T X_s / max(X_s)^2
    firsts = {name: 0.0 for name in targets}  # sum of x, for the mean
    counts = {name: 0 for name in targets}
    seq_counts = {name: 0 for name in targets}
    current_mask: list[Tensor | None] = [None]

    def make_hook(name):
        def hook(m, args):
            x = args[0].detach().float()  # (..., T, i)
            if x.dim() < 3:  # (n, i) or (i,): one sequence
                x = x.reshape(1, -1, x.shape[-1])  # (1, n, i)
            rows = x.reshape(-1, x.shape[-2], x.shape[-1])  # (S, T, i): one row per sequence
            keep = current_mask[0]  # (S, T) tokens to count, or None: all of them
            if keep is not None:
                if keep.numel() != rows.shape[0] * rows.shape[1]:
                    raise _error(
                        f"{name} saw {rows.shape[0] * rows.shape[1]} tokens but the batch mask has {keep.numel()}; "
                        "pass batches whose attention_mask matches the layer's tokens"
                    )
                keep = keep.reshape(rows.shape[:2]).bool()
            x = rows.reshape(-1, rows.shape[-1]) if keep is None else rows[keep]  # (n, i) the counted tokens
            if not torch.isfinite(x).all():
                raise _error(f"non-finite activations at the input of {name}")
            if "second_moment" in statistics:
                sums[name] = sums[name] + x.T @ x  # (i, i)
            if "sequence_second_moment" in statistics:
                for s, row in enumerate(rows):  # PEFT's CorDA: each sequence scaled by its signed max
                    xs = row if keep is None else row[keep[s]]  # (T_s, i)
                    if xs.shape[0] == 0:
                        continue
                    top = xs.max().abs()
                    if top == 0:
                        raise _error(f"{name}: a sequence whose largest input is 0 (its covariance is scaled by it)")
                    xs = xs / top
                    seq_sums[name] = seq_sums[name] + xs.T @ xs  # (i, i)
                    seq_counts[name] += 1
            firsts[name] = firsts[name] + x.sum(0)  # (i,)
            counts[name] += x.shape[0]

        return hook

    from .runtime import AttachError  # runtime imports this module

    modes = {m: m.training for m in model.modules()}  # each submodule's own flag
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n_batches = 0
    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in targets.items()]
    try:
        model.eval()
        with torch.no_grad():
            it = iter(tqdm(batches, desc="calibration", unit="batch", disable=not progress))
            while True:
                try:
                    batch = next(it)
                except StopIteration:
                    break
                except Exception as e:  # a user's generator failing
                    raise _error(f"reading batch {n_batches} raised {type(e).__name__}: {_first_line(e)}") from e
                check_batch(batch, n_batches, vocab)
                current_mask[0] = _token_mask(batch, device)
                try:
                    _call(model, batch, device)
                except AttachError:
                    raise
                except Exception as e:  # the model refuses the batch (wrong keys, shapes, dtypes)
                    raise _error(f"batch {n_batches}: the model raised {type(e).__name__}: {_first_line(e)}") from e
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, flag in modes.items():
            m.training = flag
    if n_batches == 0:
        raise _error("calibration_data is empty (no batches)")
    out = {}
    for name in targets:
        if counts[name] == 0:
            raise _error(f"{name} saw no (non-padding) tokens")
        out[name] = {"mean": firsts[name] / counts[name], "tokens": counts[name]}
        if "second_moment" in statistics:
            out[name]["second_moment"] = sums[name] / counts[name]
        if "sequence_second_moment" in statistics:
            out[name]["sequence_second_moment"] = seq_sums[name] / seq_counts[name]
            out[name]["sequences"] = seq_counts[name]
    return out
