"""GSM8K data for the bench: the hub, a local folder, or the packaged subset; batch order.

Sources (`load_data`): --data-dir (GSM8K-format train.jsonl / test.jsonl, optionally .gz), else
with --data gsm8k (the default) openai/gsm8k from the hub when it answers, else the subset that
ships in this package (lora_lite/bench/gsm8k: the first 2,400 train and all 1,319 test
questions of GSM8K, MIT licence, Cobbe et al. 2021, arXiv:2110.14168); --data builtin: templated
arithmetic problems written for this project.

Batch order (`TrainOrder`): training draws from the first TRAIN_POOL train questions in a seeded
order (a fresh permutation each pass), so the hub, a full local copy and the packaged subset
give the same batches. Calibration rows come from a second, separately seeded stream: a variant
that calibrates trains on the same batches as one that does not.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

PACKAGED = Path(__file__).parent / "gsm8k"
TRAIN_POOL = 2400  # the packaged train rows; 300 steps x batch 8 is one pass
SOURCES = ("gsm8k", "builtin")


@dataclass(frozen=True)
class Example:
    question: str
    answer: str  # worked solution ending in "#### <number>"

    @property
    def gold(self) -> str | None:
        m = re.search(r"####\s*(.+)$", self.answer.strip())
        return normalise_number(m.group(1)) if m else None


@dataclass(frozen=True)
class Dataset:
    train: list[Example]
    test: list[Example]
    source: str  # named in the results header


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
    """GSM8K rows of a .jsonl or .jsonl.gz file. Raises ValueError naming file and line."""
    out = []
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out.append(Example(rec["question"], clean_answer(rec["answer"])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: expected JSON with 'question' and 'answer' ({e})") from None
    return out


def split_file(folder: Path, split: str) -> Path | None:
    """folder/<split>.jsonl or folder/<split>.jsonl.gz, whichever exists."""
    for name in (f"{split}.jsonl", f"{split}.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_folder(folder: Path, what: str) -> Dataset:
    """train and test of a GSM8K-format folder. Raises ValueError for a missing split."""
    files = {s: split_file(folder, s) for s in ("train", "test")}
    for split, f in files.items():
        if f is None:
            raise ValueError(f"--data-dir {folder}: missing {split}.jsonl (GSM8K format: question, answer '#### n')")
    return Dataset(read_jsonl(files["train"]), read_jsonl(files["test"]), what)


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

    if any(os.environ.get(k, "0") not in ("0", "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    try:
        socket.create_connection((os.environ.get("HF_ENDPOINT_HOST", "huggingface.co"), 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_gsm8k() -> Dataset | None:
    """openai/gsm8k (main) from the hub, or None when the hub or `datasets` is not available."""
    if not hub_reachable():
        return None
    try:
        import datasets

        ds = datasets.load_dataset("openai/gsm8k", "main")
    except Exception as e:  # no datasets, hub error: the packaged copy takes over, and the header says so
        warnings.warn(f"openai/gsm8k from the hub failed ({type(e).__name__}); using the packaged subset", stacklevel=2)
        return None
    conv = lambda split: [Example(r["question"], clean_answer(r["answer"])) for r in ds[split]]
    train, test = conv("train"), conv("test")
    return Dataset(train, test, f"GSM8K, openai/gsm8k from the hub ({len(train)} train, {len(test)} test questions)")


def load_data(source: str, data_dir: str | None, seed: int) -> Dataset:
    """The bench's data (see the module docstring). Raises ValueError for an unknown source or
    a --data-dir without train/test files."""
    if source not in SOURCES:
        raise ValueError(f"--data {source!r}: expected one of {', '.join(SOURCES)}")
    if data_dir:
        d = read_folder(Path(data_dir), "")
        return Dataset(
            d.train,
            d.test,
            f"GSM8K-format jsonl from {Path(data_dir).name}/ ({len(d.train)} train, {len(d.test)} test)",
        )
    if source == "builtin":
        return Dataset(builtin_problems(2000, seed), builtin_problems(300, seed + 1), "built-in arithmetic problems")
    hub = hub_gsm8k()
    if hub is not None:
        return hub
    d = read_folder(PACKAGED, "")
    return Dataset(
        d.train, d.test, f"GSM8K, packaged subset (first {len(d.train)} train, {len(d.test)} test questions)"
    )


class TrainOrder:
    """Row indices of the training batches: passes over the first TRAIN_POOL rows, each pass a
    permutation seeded by (seed, pass). Independent of every other random stream."""

    def __init__(self, n_rows: int, seed: int):
        self.pool, self.seed = min(n_rows, TRAIN_POOL), seed

    def batch(self, step: int, batch_size: int) -> list[int]:
        """Indices of the rows of batch `step` (0-based)."""
        ks = range(step * batch_size, (step + 1) * batch_size)
        return [permutation(self.pool, self.seed, k // self.pool)[k % self.pool] for k in ks]


@functools.lru_cache(maxsize=4)
def permutation(pool: int, seed: int, epoch: int) -> tuple[int, ...]:
    """Pass `epoch` of the training order: range(pool) shuffled by its own seeded stream."""
    return tuple(random.Random(f"train-{seed}-{epoch}").sample(range(pool), pool))


def calibration_rows(n_rows: int, count: int, seed: int) -> list[int]:
    """Indices of `count` calibration rows, from their own stream (not the training order's)."""
    rng = random.Random(f"calibration-{seed}")
    return rng.sample(range(min(n_rows, TRAIN_POOL)), min(count, n_rows, TRAIN_POOL))
