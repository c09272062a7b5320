"""Shared fixtures: tiny models, calibration batches, the --update-golden flag."""

from __future__ import annotations

from typing import NamedTuple

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


def saved_shapes(fn) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd keeps for backward while fn() runs (matmul may save views,
    so compare element counts where a view's shape is not the tensor's)."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


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


class Snapshot(NamedTuple):
    """What a refusal must leave exactly as it was (see assert_unchanged)."""

    state_dict: dict  # name -> cloned tensor
    requires_grad: dict  # parameter name -> flag
    training: dict  # module name -> its own train/eval flag
    hooks: dict  # module name -> (forward, forward pre-, state_dict, load_state_dict pre-hooks), each ((id, hook), ...)
    attributes: dict  # module name -> sorted names in its __dict__ (no stray caches or state)
    state: object  # ll.state(model): the attached adapter's State, or None
    configs: object  # that State's config and each target's, or None
    adapters: dict  # every attached adapter (named ones too): name -> (id(State), config, per-target knobs)


def _hooks(m) -> tuple:
    forward = tuple(m._forward_hooks.items()), tuple(m._forward_pre_hooks.items())
    return *forward, tuple(m._state_dict_hooks.items()), tuple(m._load_state_dict_pre_hooks.items())


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (NaN equals itself, -0.0 differs from 0.0)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _configs(st) -> tuple | None:
    return None if st is None else (st.cfg, {n: t.cfg for n, t in st.targets.items()})


def _adapters(model) -> dict:
    return {
        n: (id(st), st.cfg, {k: (t.cfg, t.scale, t.enabled, t.handle) for k, t in st.targets.items()})
        for n, st in ll.states(model).items()
    }


def snapshot(model) -> Snapshot:
    """Everything assert_unchanged compares, copied now."""
    return Snapshot(
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
        {n: _hooks(m) for n, m in model.named_modules()},
        {n: sorted(vars(m)) for n, m in model.named_modules()},
        ll.state(model),
        _configs(ll.state(model)),
        _adapters(model),
    )


def assert_unchanged(model, snap: Snapshot) -> None:
    """State_dict bitwise equal (same keys, dtypes, values), the same requires_grad flags, every
    submodule's own train/eval flag, the same hooks (no new ones, none removed), no new module
    attributes, and the same adapter state and configs (None when nothing was attached), for
    every attached adapter by name (config, ll.scale, on/off, hook)."""
    now = model.state_dict()
    assert now.keys() == snap.state_dict.keys()
    for k, v in snap.state_dict.items():
        assert now[k].dtype == v.dtype and now[k].shape == v.shape and now[k].device == v.device, k
        assert v.is_meta or torch.equal(_bits(now[k]), _bits(v)), k  # meta tensors hold no values
    assert {n: p.requires_grad for n, p in model.named_parameters()} == snap.requires_grad
    assert {n: m.training for n, m in model.named_modules()} == snap.training
    assert {n: _hooks(m) for n, m in model.named_modules()} == snap.hooks
    assert {n: sorted(vars(m)) for n, m in model.named_modules()} == snap.attributes
    assert ll.state(model) is snap.state
    assert _configs(ll.state(model)) == snap.configs
    assert _adapters(model) == snap.adapters


def _llama_config(**kw):
    """LlamaConfig of the tiny test models: vocab 64, hidden 32, 2 layers, k/v 32 -> 16, MLP 32 -> 64."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **kw,
    )


def llama(seed: int = 0):
    """Tiny random LlamaForCausalLM (fp32, biases on q/k/v/o); q 32->32, k/v 32->16, MLP 32->64->32."""
    import transformers

    cfg = _llama_config(attention_bias=True, initializer_range=0.2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF zero-initialises biases; give them values so bias handling matters
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.2)
    return model


def hf_llama(seed: int = 0, tie: bool = False):
    """Tiny random transformers LlamaForCausalLM (no hub): vocab 64, hidden 32, 2 layers, k/v 32 -> 16."""
    import transformers

    cfg = _llama_config(tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


class ScaledEmbedding(torch.nn.Embedding):
    """An embedding that multiplies its rows by a scalar buffer `embed_scale` (as Gemma 3's)."""

    def __init__(self, weight: torch.Tensor, padding_idx: int, scale: float):
        super().__init__(*weight.shape, padding_idx=padding_idx)
        self.weight.data.copy_(weight)
        self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


def crop_specs() -> list[str]:
    """Shipped specs whose default residual is crop (W holds W_res while attached)."""
    return [n for n in SPECS if ll.variant_module(n).RESIDUAL == "crop"]


def hf_gpt2(seed: int = 0):
    """Tiny random transformers GPT2LMHeadModel (Conv1D layers, lm_head tied to wte): vocab 64,
    hidden 32, 2 blocks; c_attn 32 -> 96, attn.c_proj 32 -> 32, c_fc 32 -> 128, mlp.c_proj 128 -> 32."""
    import transformers

    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF zero-initialises biases; give them values so bias handling matters
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.2)
    return model


def smollm2_shaped_layer():
    """One random Llama layer of SmolLM2-135M's shape (q 576 -> 576, k/v 576 -> 192, MLP 576 -> 1536)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


class CpuBlockDiag:
    """PEFT's BOFT FastBlockDiag (a CUDA kernel) on the CPU: (f, n, b, b) -> (f, n b, n b), block by block."""

    @staticmethod
    def apply(R: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.block_diag(*r) for r in R])
