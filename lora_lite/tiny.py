"""A tiny Llama-shaped causal LM in plain PyTorch, for tests and the offline example.

Module names follow Hugging Face Llama (`model.layers.<i>.self_attn.q_proj`, `mlp.down_proj`,
`lm_head`), so default spec targets match it without transformers or downloads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class TinyConfig:
    vocab: int = 64
    d: int = 32  # hidden size
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2  # k_proj/v_proj are d -> d * n_kv_heads / n_heads, as in grouped-query attention
    d_ff: int = 64
    bias: bool = False


class Attention(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.c = c
        hd = c.d // c.n_heads
        self.q_proj = nn.Linear(c.d, c.d, bias=c.bias)
        self.k_proj = nn.Linear(c.d, hd * c.n_kv_heads, bias=c.bias)
        self.v_proj = nn.Linear(c.d, hd * c.n_kv_heads, bias=c.bias)
        self.o_proj = nn.Linear(c.d, c.d, bias=c.bias)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        c, hd = self.c, self.c.d // self.c.n_heads
        q = self.q_proj(x).view(B, T, c.n_heads, hd).transpose(1, 2)  # (B, h, T, hd)
        k = self.k_proj(x).view(B, T, c.n_kv_heads, hd).transpose(1, 2)  # (B, kv, T, hd)
        v = self.v_proj(x).view(B, T, c.n_kv_heads, hd).transpose(1, 2)
        rep = c.n_heads // c.n_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B, h, T, hd)
        attn = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T) causal
        if mask is not None:
            attn = attn & mask[:, None, None, :].bool()  # (B, 1, T, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn)  # (B, h, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, c.d))


class MLP(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.d, c.d_ff, bias=c.bias)
        self.up_proj = nn.Linear(c.d, c.d_ff, bias=c.bias)
        self.down_proj = nn.Linear(c.d_ff, c.d, bias=c.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(c.d)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = nn.RMSNorm(c.d)
        self.mlp = MLP(c)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Inner(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab, c.d)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = nn.RMSNorm(c.d)


class TinyLM(nn.Module):
    """Causal LM: input_ids (B, T) [+ attention_mask (B, T)] -> logits (B, T, vocab)."""

    def __init__(self, c: TinyConfig | None = None, **kw):
        super().__init__()
        self.config = c or TinyConfig(**kw)
        self.model = Inner(self.config)
        self.lm_head = nn.Linear(self.config.d, self.config.vocab, bias=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x = self.model.embed_tokens(input_ids)  # (B, T, d)
        for block in self.model.layers:
            x = block(x, attention_mask)
        return self.lm_head(self.model.norm(x))  # (B, T, vocab)


def tiny_lm(seed: int = 0, **kw) -> TinyLM:
    """A TinyLM with weights drawn from a fixed seed (same seed, same weights)."""
    torch.manual_seed(seed)
    return TinyLM(**kw)
