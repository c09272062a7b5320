"""Batches and measures: answer NLL under teacher forcing and greedy accuracy.

Answer NLL is the mean per-token negative log-likelihood of the reference answer tokens (prompt
tokens masked with -100), the measure that ranks adapters at this model size; accuracy compares
the last number of a greedy continuation with the gold number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import BenchConfig
from .data import Example, normalise_number


@dataclass
class Env:
    """What every measurement needs besides the model: tokenizer, device, settings."""

    tok: object
    device: str
    cfg: BenchConfig

    def autocast(self):
        """bf16 autocast when the settings ask for it, else a no-op context."""
        dev = str(self.device).split(":")[0]
        return torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=self.cfg.autocast)

    def batch(self, examples: list[Example], labels: bool = True) -> dict:
        """Collated batch of `examples` on the device (labels dropped when `labels` is False)."""
        b = collate([encode(self.tok, e, self.cfg.seq_len) for e in examples], self.tok.pad_token_id, self.device)
        return b if labels else {k: v for k, v in b.items() if k != "labels"}


def logits_of(out) -> torch.Tensor:
    """Logits (B, T, V) of a transformers output or of a model that returns the tensor."""
    return out.logits if hasattr(out, "logits") else out


def prompt_of(ex: Example) -> str:
    """The prompt the model continues: the question, then "Answer:"."""
    return f"Question: {ex.question}\nAnswer:"


def encode(tok, ex: Example, seq_len: int) -> tuple[list[int], list[int]]:
    """(ids, labels) with prompt tokens masked (-100), truncated to seq_len."""
    p = tok.encode(prompt_of(ex))
    p = p[-max(seq_len // 2, seq_len - 64) :]  # an over-long prompt is cut from the left: keep answer tokens
    a = tok.encode(" " + ex.answer) + [tok.eos_token_id]
    ids = (p + a)[:seq_len]
    labels = ([-100] * len(p) + a)[:seq_len]
    return ids, labels


def collate(rows: list[tuple[list[int], list[int]]], pad: int, device) -> dict:
    """Right-padded input_ids, attention_mask, labels, each (B, T) with T the longest row."""
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def answer_nll_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of answer-token NLL, answer token count) under teacher forcing."""
    logits = logits_of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]  # (B, T-1, V), (B, T-1)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return nll, int((labels != -100).sum())


def eval_nll(model, env: Env, examples: list[Example], desc: str) -> float:
    """Mean per-token NLL of the reference answers of `examples` (prompt masked)."""
    total, count, bs = 0.0, 0, env.cfg.batch_size
    model.eval()
    with torch.no_grad(), env.autocast():
        for i in tqdm(range(0, len(examples), bs), desc=desc, unit="batch", leave=False):
            s, n = answer_nll_sum(model, env.batch(examples[i : i + bs]))
            total, count = total + float(s), count + n
    return total / max(count, 1)


def greedy_loop(model, env: Env, prompt: str) -> str:
    """Greedy continuation of one prompt with plain forwards (models without `generate`)."""
    ids = torch.tensor([env.tok.encode(prompt)], device=env.device)
    new = []
    for _ in range(env.cfg.max_new_tokens):
        nxt = int(logits_of(model(ids))[0, -1].argmax())
        if nxt == env.tok.eos_token_id:
            break
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=env.device)], 1)
    return env.tok.decode(new)


def greedy_batch(model, env: Env, prompts: list[str]) -> list[str]:
    """Greedy continuations of `prompts`, left-padded into one `generate` call."""
    rows = [env.tok.encode(p) for p in prompts]
    T, pad = max(len(r) for r in rows), env.tok.pad_token_id
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows], device=env.device)  # (B, T)
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=env.device)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=env.cfg.max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=env.tok.eos_token_id,
    )
    return [env.tok.decode([t for t in row if t != pad]) for row in out[:, T:].tolist()]


def is_correct(text: str, ex: Example) -> bool:
    """The answer's '#### n' (else its last number) equals the gold number."""
    text = text.split("Question:")[0]
    m = re.search(r"####\s*([^\n]+)", text)
    return (normalise_number(m.group(1) if m else text) or "?") == ex.gold


def accuracy(model, env: Env, examples: list[Example], desc: str) -> float:
    """Fraction of `examples` whose greedy answer is correct (batches of 16 questions)."""
    if not examples:
        return 0.0
    model.eval()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model
    hits, step = 0, 16 if hasattr(base, "generate") else 1
    with torch.no_grad(), env.autocast():
        for i in tqdm(range(0, len(examples), step), desc=desc, unit=f"x{step} questions", leave=False):
            chunk = examples[i : i + step]
            prompts = [prompt_of(e) for e in chunk]
            texts = greedy_batch(model, env, prompts) if step > 1 else [greedy_loop(model, env, prompts[0])]
            hits += sum(is_correct(t, e) for t, e in zip(texts, chunk))
    return hits / len(examples)
