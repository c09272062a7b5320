"""Input statistics of target layers, gathered on the intact model before anything changes.

    collect_input_stats(model, targets, batches)
        -> {name: {"second_moment": (i, i), "mean": (i,), "tokens": n}}

second_moment = mean over counted tokens of x x^T (fp32), the statistic the data-driven bases
need: CorDA's covariance C, Wanda's per-direction rms (v^T C v); with `mean` it gives the
centred covariance whose top eigenvectors are EVA's PCA directions. Counted tokens: those with
attention_mask 1 and, when the batch has `labels` of the same shape, labels != -100 (the
positions a loss ignores, as PEFT's EVA `use_label_mask`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


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
    raise ValueError(
        f"calibration batch of type {type(batch).__name__}: expected a dict "
        "(input_ids, attention_mask, ...), a tuple of tensors, or a tensor"
    )


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
    model: nn.Module, targets: dict[str, nn.Module], batches: Iterable, progress: bool = True
) -> dict[str, dict]:
    """Second moment of each target's input over `batches` (padding excluded); model unchanged.

    Raises ValueError for an empty iterable, a bad batch, or non-finite activations (naming the
    layer). The model's train/eval mode and parameters are left as they were.
    """
    if isinstance(batches, (Tensor, Mapping)):
        batches = [batches]
    sums = {name: None for name in targets}
    firsts = {name: None for name in targets}  # sum of x, for the mean
    counts = {name: 0 for name in targets}
    current_mask: list[Tensor | None] = [None]

    def make_hook(name):
        def hook(m, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()  # (n, i)
            mask = current_mask[0]
            if mask is not None:
                if mask.numel() != x.shape[0]:
                    raise ValueError(
                        f"calibration: {name} saw {x.shape[0]} tokens but the batch mask has {mask.numel()}; "
                        "pass batches whose attention_mask matches the layer's tokens"
                    )
                x = x[mask.reshape(-1).bool()]
            if not torch.isfinite(x).all():
                raise ValueError(f"calibration: non-finite activations at the input of {name}")
            s = x.T @ x  # (i, i)
            sums[name] = s if sums[name] is None else sums[name] + s
            f = x.sum(0)  # (i,)
            firsts[name] = f if firsts[name] is None else firsts[name] + f
            counts[name] += x.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in targets.items()]
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n_batches = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
                current_mask[0] = _token_mask(batch, device)
                _call(model, batch, device)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("calibration: calibration_data is empty (no batches)")
    out = {}
    for name in targets:
        if counts[name] == 0:
            raise ValueError(f"calibration: {name} saw no (non-padding) tokens")
        out[name] = {
            "second_moment": sums[name] / counts[name],
            "mean": firsts[name] / counts[name],
            "tokens": counts[name],
        }
    return out
