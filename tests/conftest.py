"""Shared fixtures: tiny models, calibration batches, the --update-golden flag."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll
from lora_lite.tiny import tiny_lm

# Variants whose init is deliberately not the identity, with the reason (shown in failures).
NOT_IDENTITY_AT_INIT: dict[str, str] = {
    "antipasto_ablate": "strength = sigmoid(logit) starts at 0.05, not 0, so c gets a gradient at step 0",
}


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/*.safetensors")


@pytest.fixture
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


SPECS = ll.shipped_names()


def make_model(seed: int = 0, **kw):
    """Tiny Llama-shaped LM; k/v projections are 32 -> 16, the MLP 32 -> 64 -> 32."""
    return tiny_lm(seed=seed, **kw).eval()


def token_batch(seed: int = 0, batch: int = 4, seq: int = 12, vocab: int = 64, pad: int = 0) -> dict:
    """input_ids (B, T) and attention_mask with `pad` left-padding positions in row 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def calibration(n: int = 6, seq: int = 16) -> list[dict]:
    """Calibration batches with enough tokens for every data-driven basis on the tiny model."""
    return [token_batch(seed=100 + i, batch=4, seq=seq, pad=3) for i in range(n)]


# Block and group sizes that fit the tiny model's 16 and 32 features (PEFT's defaults do not)
SMALL_SIZES = {"block": 2, "group_size": 8, "oft_block_size": 4, "boft_block_size": 4}


def small_cfg(name: str, **kw):
    """The spec's config with ranks small enough for the tiny model (r <= 4 unless given)."""
    mod = ll.variant_module(name)
    over = {k: 4 for k in mod.RANKS if getattr(mod.Config(), k) > 4}
    over |= {k: v for k, v in SMALL_SIZES.items() if k in mod.BOUNDS}
    over.update(kw)
    return ll.from_spec(name, **over)


def attach_small(model, name: str, **kw):
    cfg = small_cfg(name, **kw)
    ll.attach(model, cfg, calibration_data=calibration(), progress=False)
    return cfg


def perturb(model, seed: int = 1, scale: float = 0.1) -> None:
    """Move every trainable adapter tensor away from its init, deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def logits(model, batch: dict | None = None) -> torch.Tensor:
    batch = batch or token_batch(seed=7)
    with torch.no_grad():
        return model(**batch).float()


def lm_loss(model, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM on `batch` (every position counted)."""
    out = model(**batch)
    return torch.nn.functional.cross_entropy(
        out[:, :-1].reshape(-1, out.shape[-1]).float(), batch["input_ids"][:, 1:].reshape(-1)
    )


def snapshot(model) -> tuple[dict, dict]:
    """Copies of the state_dict values and the requires_grad flags, for assert_unchanged."""
    return {k: v.clone() for k, v in model.state_dict().items()}, {
        n: p.requires_grad for n, p in model.named_parameters()
    }


def assert_unchanged(model, snap) -> None:
    """State_dict bitwise equal, same flags, no adapter state, no hooks left behind."""
    sd, flags = snap
    now = model.state_dict()
    assert now.keys() == sd.keys()
    for k in sd:
        assert torch.equal(now[k], sd[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert ll.state(model) is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
