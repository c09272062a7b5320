"""The end-to-end example behind `lora-lite example`: runs offline in seconds on a CPU.

A tiny Llama-shaped model learns a toy rule (each next token is the current one plus 1).
Attach from a spec, train a few AdamW steps, save, detach (outputs equal the base model's
again), load (outputs equal the trained model's).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import lora_lite as ll
from lora_lite.tiny import tiny_lm


def toy_batch(gen: torch.Generator, vocab: int = 64, batch: int = 16, seq: int = 24) -> torch.Tensor:
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    return (start + torch.arange(seq)) % vocab  # (B, T)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def run(variant: str = "lora", steps: int = 20, out: str = "example-out", lr: float | None = None) -> dict:
    """Run the example for one spec name or path; returns the measured numbers."""
    model = tiny_lm(seed=0, n_layers=2)
    gen = torch.Generator().manual_seed(0)
    calib = [{"input_ids": toy_batch(gen), "attention_mask": torch.ones(16, 24, dtype=torch.long)} for _ in range(4)]
    probe = toy_batch(torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = model(probe)
    cfg = ll.from_spec(variant)
    ll.attach(model, cfg, calibration_data=calib, progress=False)
    params = ll.trainable_parameters(model)
    n_params = sum(p.numel() for p in params)
    lr = lr or max(cfg.variant().LR, 1e-2)  # a toy task on a random model: larger than the spec's lr
    opt = torch.optim.AdamW(params, lr=lr)
    with torch.no_grad():
        before = lm_loss(model, probe).item()
    for _ in range(steps):
        loss = lm_loss(model, toy_batch(gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = lm_loss(model, probe).item()
        trained_logits = model(probe)
    path = ll.save(model, Path(out) / f"{cfg.variant().NAME}.safetensors")
    ll.detach(model)
    with torch.no_grad():
        detach_diff = (model(probe) - base_logits).abs().max().item()
    ll.load(model, path)
    with torch.no_grad():
        reload_diff = (model(probe) - trained_logits).abs().max().item()
    result = dict(
        variant=cfg.variant().NAME,
        trainable_params=n_params,
        lr=lr,
        steps=steps,
        loss_before=before,
        loss_after=after,
        detach_max_abs_diff=detach_diff,
        reload_max_abs_diff=reload_diff,
        path=str(path),
    )
    print(
        f"{result['variant']}: {n_params} trainable params, lr {lr:g}, {steps} steps: loss {before:.3f} -> {after:.3f}"
    )
    print(
        f"saved {path}; detach -> base logits max |diff| {detach_diff:.2e}; "
        f"load -> trained logits max |diff| {reload_diff:.2e}"
    )
    return result
