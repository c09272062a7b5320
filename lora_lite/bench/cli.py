"""`lora-lite bench` command line: flags -> BenchConfig -> runs -> results."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

import lora_lite as ll

from .config import DEFAULTS, QUICK, SMOLLM2, BenchConfig
from .data import SOURCES, load_data
from .evaluate import Env, eval_nll
from .models import load_model
from .report import markdown_table, settings_line, write_json_atomic, write_outputs
from .run import Bench, fingerprint, run_one
from .twins import TWINS


def parser() -> argparse.ArgumentParser:
    """The flags of `lora-lite bench` (presets fill the ones left out: see config_from)."""
    p = argparse.ArgumentParser(prog="lora-lite bench", description="Train and evaluate adapters on a causal LM.")
    p.add_argument("--model", default=SMOLLM2, help=f"{SMOLLM2} (default), a hub id, a folder, a .gguf, or tiny")
    p.add_argument("--data", default="gsm8k", choices=SOURCES, help="gsm8k: the hub, else the packaged subset")
    p.add_argument("--data-dir", default=None, help="folder with GSM8K-format train.jsonl and test.jsonl")
    p.add_argument("--variants", help="comma list of spec names or paths, 'all' (default) or 'twins' (with PEFT twin)")
    p.add_argument("--peft", action="store_true", help="also train PEFT's version of each variant PEFT has")
    for flag in ("--steps", "--batch-size", "--seq-len", "--eval-samples", "--gen-samples", "--max-new-tokens"):
        p.add_argument(flag, type=int)
    p.add_argument("--lr", type=float, default=None, help="default: the spec's recommended lr")
    p.add_argument("--lr-floor", type=float, help="use max(spec lr, this) when --lr is not given (--quick: 1e-3)")
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
    return p


def variant_names(text: str) -> tuple[str, ...]:
    """'all', 'twins' or a comma list -> spec names/paths. Raises ValueError for an unknown spec
    or a variant given twice (by name or path)."""
    if text in ("all", "twins"):
        names = [n for n in ll.shipped_names() if text == "all" or n in TWINS]
    else:
        names = [v.strip() for v in text.split(",") if v.strip()]
    seen = {}
    for n in names:
        spec = ll.variant_module(n).NAME  # fail fast on a bad name before loading anything
        if spec in seen:  # one run per variant: a second would overwrite its record's adapter file
            raise ValueError(f"--variants: {spec} is given twice ({seen[spec]!r}, {n!r})")
        seen[spec] = n
    return tuple(names)


# Smallest value of each count flag (--seq-len 1 would keep no answer token to score)
MINIMUM = dict(steps=1, batch_size=1, seq_len=2, eval_samples=1, gen_samples=0, max_new_tokens=1, calib_batches=0)


def check_settings(values: dict) -> None:
    """Raises ValueError naming the flag of a count below its MINIMUM or a negative or non-finite lr."""
    for k, low in MINIMUM.items():
        if values[k] < low:
            raise ValueError(f"--{k.replace('_', '-')}: must be at least {low}, got {values[k]}")
    for k in ("lr", "lr_floor"):
        if values[k] is not None and not (math.isfinite(values[k]) and values[k] >= 0):
            raise ValueError(f"--{k.replace('_', '-')}: must be a finite number >= 0, got {values[k]:g}")


def check_device(device: str) -> None:
    """Raises ValueError for a device string torch does not parse or a CUDA device that is not there."""
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {device!r}; use auto, cpu, cuda, cuda:1 ...") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {device!r} asked for, but no CUDA device is available")


def config_from(a: argparse.Namespace) -> BenchConfig:
    """BenchConfig of parsed flags (preset values where a flag is not given). Raises ValueError,
    naming the flag, for an out-of-range value (check_settings, check_device) or an unknown spec."""
    preset = QUICK if a.quick else DEFAULTS
    pick = {k: getattr(a, k) if getattr(a, k, None) is not None else v for k, v in preset.items()}
    check_settings(dict(pick, lr=a.lr, calib_batches=a.calib_batches))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    check_device(device)
    ll.config.as_dtype(a.dtype, "--dtype")  # one-line error for a bad dtype
    autocast = a.autocast == "on" or (a.autocast == "auto" and device.startswith("cuda"))
    keep = ("model", "data", "data_dir", "lr", "calib_batches", "dtype", "seed", "out", "peft", "quick", "verbose")
    return BenchConfig(
        **{k: getattr(a, k) for k in keep},
        **{k: v for k, v in pick.items() if k != "variants"},
        variants=variant_names(pick["variants"]),
        device=device,
        autocast=autocast,
    )


def versions(cfg: BenchConfig) -> dict:
    """Library versions recorded with each result (peft only when --peft imported it)."""
    v = {"torch": torch.__version__, "lora_lite": getattr(ll, "__version__", "0")}
    if cfg.peft:
        import peft

        v["peft"] = peft.__version__
    return v


def prepare(cfg: BenchConfig) -> Bench:
    """Data, model, base answer NLL and the base fingerprint every run is checked against."""
    log = lambda s: tqdm.write(s)
    data = load_data(cfg.data, cfg.data_dir, cfg.seed)
    torch.manual_seed(cfg.seed)
    try:
        model, tok, desc = load_model(cfg.model, cfg.device, ll.config.as_dtype(cfg.dtype, "--dtype"))
    except OSError as e:  # no such folder, file or hub id (offline): transformers' message, first line
        raise ValueError(f"--model {cfg.model}: cannot load it: {first_line(e)}") from None
    b = Bench(model=model, env=Env(tok, cfg.device, cfg), data=data, log=log, model_desc=desc)
    log(f"model: {desc}; data: {data.source}; device {cfg.device}")
    # The base model is the same before every run (each run checks its bits), so its NLL is measured once.
    b.nll_before = eval_nll(model, b.env, data.test[: cfg.eval_samples], "eval base model")
    log(f"base model answer NLL: {b.nll_before:.3f} on {min(cfg.eval_samples, len(data.test))} test questions")
    b.fingerprint = fingerprint(model)
    return b


def runs(cfg: BenchConfig) -> list[tuple[str, str]]:
    """(spec, library) of every run: each variant, then its PEFT twin when --peft."""
    out = []
    for name in cfg.variants:
        out.append((name, "lora-lite"))
        if cfg.peft and ll.variant_module(name).NAME in TWINS:
            out.append((name, "peft"))
    return out


def run_all(b: Bench, cfg: BenchConfig) -> int:
    """Every run in turn, results rewritten after each; a failing run is recorded in errors.json
    and the others go on. Returns the number of failed runs."""
    out, records, errors = Path(cfg.out), [], []
    meta = dict(model=b.model_desc, data=b.data.source, device=str(cfg.device), settings=cfg.settings())
    meta["versions"] = versions(cfg)
    (out / "errors.json").unlink(missing_ok=True)  # a previous run's
    for name, library in runs(cfg):
        try:
            rec = run_one(b, name, library)
        except Exception as e:  # one run failing must not lose the others: record it and go on
            errors.append({"variant": name, "library": library, "error": f"{type(e).__name__}: {first_line(e)}"})
            b.log(f"{name} ({library}): FAILED: {errors[-1]['error']}")
            write_json_atomic(out / "errors.json", errors)
            continue
        records.append(dict(rec, **meta))
        write_outputs(out, records)
        b.log(summary(rec))
    return len(errors)


def first_line(e: Exception) -> str:
    """The first line of an error message (errors are reported on one line)."""
    return str(e).splitlines()[0] if str(e) else ""


def summary(r: dict) -> str:
    """The log line of one finished run."""
    return (
        f"{r['variant']} ({r['library']}): nll {r['eval_nll_before']:.3f} -> {r['eval_nll_after']:.3f}, "
        f"acc {r['accuracy']:.1%}, {r['trainable_params']:,} params, {r['step_ms']:.0f} ms/step, "
        f"calibration {r['calibration_s']:.1f} s, build {r['build_s']:.1f} s, "
        f"reload diff {r['reload_max_abs_diff']:.1e}, wall {r['wall_s']:.1f} s"
    )


def report(path: str) -> str:
    """The settings line and markdown table of a results.json. Raises ValueError naming the file."""
    try:
        records = json.loads(Path(path).read_text())
        return settings_line(records[0]) + "\n\n" + markdown_table(records)
    except OSError as e:
        raise ValueError(f"--report {path}: cannot read it: {e.strerror or e}") from None
    except (ValueError, LookupError, TypeError, AttributeError) as e:  # not JSON, or not the bench's records
        raise ValueError(f"--report {path}: not a lora-lite bench results.json ({type(e).__name__}: {e})") from None


def make_out(out: str) -> None:
    """Creates the results folder (before the model loads). Raises ValueError naming it."""
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the folder: {e.strerror or e}") from None


def main(argv=None) -> int:
    """Entry point of `lora-lite bench`; exit 0, 1 (a run failed) or 2 (bad input)."""
    a = parser().parse_args(argv)
    try:
        if a.report:
            print(report(a.report), end="")
            return 0
        cfg = config_from(a)
        make_out(cfg.out)
        b = prepare(cfg)
    except ValueError as e:
        print(f"lora-lite bench: error: {first_line(e)}", file=sys.stderr)
        return 2
    failed = run_all(b, cfg)
    b.log(f"wrote {Path(cfg.out) / 'results.json'}, results.md, loss.png")
    if failed:
        b.log(f"{failed} run(s) failed, see {Path(cfg.out) / 'errors.json'}")
    return 1 if failed else 0
