"""Speed and memory side by side: lora-lite, PEFT and the frozen-base limit, in one process.

    python benchmarks/speed.py --model tiny                              # CPU smoke, seconds
    python benchmarks/speed.py --model cpu-medium                        # the committed CPU table
    python benchmarks/speed.py --model qwen3-0.6b-shape --device cuda    # see benchmarks/gpu_run.sh

One random transformers Qwen3 causal LM, one token batch, one dtype. Every configuration runs
on its own deep copy of that model:
  - limit: the frozen base with activation gradients only (no adapter; the input embeddings'
    output requires grad, so backward crosses every layer): the time no adapter can beat;
  - PEFT's version of each variant both libraries have (the bench's pairing table,
    lora_lite.bench.twins.TWINS: LoRA, PiSSA, DoRA, DeLoRA, IA3, IA3-FF, HRA, EVA, OLoRA, rsLoRA,
    PiSSA-DoRA, EVA-DoRA, CorDA, CorDA-DoRA, RoAd, LoHa, OFT, BOFT), get_peft_model on the copy
    (EVA: plus initialize_lora_eva_weights; CorDA: preprocess_corda first), its config built from
    the same lora-lite config (ll_overrides), on the same target modules;
  - lora-lite's version, ll.attach on the copy;
  - the AntiPaSTO family (lora-lite only: antipasto, _corda, _ablate, _arrow) at --r-spectral,
    beside PEFT's PiSSA (full SVD, and 4 power iterations) and CorDA inits at the same rank and
    targets, whose attach time is the reference.
With --compile, the limit and both libraries' version of each shared variant also run under
torch.compile (--compile-backend, inductor by default; compiled in the warm-up steps, so at least
one is run): their rows say "compiled", and their ratios are to the compiled limit and the
compiled PEFT row.
A training step is forward (causal LM loss on the batch), backward and an AdamW step. Steps are
interleaved: each repetition runs every configuration once, in an order rotated by one each
repetition, so machine load and clock changes hit all of them alike. Ratios are paired: the
ratio of two configurations' times within each repetition, then the median (and quartiles) of
those ratios.

Peak memory is what the step would peak at with this configuration alone on the device: the
bytes resident for it (its parameters, buffers and AdamW state, each storage once) plus the
highest allocation above that during a step. On CUDA that increase is max_memory_allocated
minus memory_allocated at the step's start (every step; the maximum is reported); on the CPU
it is read from one profiled step after the timed ones: torch.profiler's allocator events
(profile_memory=True), summed in time order, exact bytes of the CPU allocator (RSS would be
noisy and tracemalloc does not see tensor memory). Attach time is the fastest of
--attach-reps fresh copies (the first call pays one-off costs: imports, kernel set-up); the copy
itself is not timed; CUDA is synchronised.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import lora_lite as ll
from lora_lite.bench.twins import TWINS, Twin
from lora_lite.bench.twins import lora as peft_lora

SHARED = list(TWINS)  # the specs with a PEFT twin
FAMILY = ["antipasto", "antipasto_corda", "antipasto_ablate", "antipasto_arrow"]
TITLES = {name: ll.variant_module(name).TITLE for name in SHARED + FAMILY}
QV = ["q_proj", "v_proj"]

# Model shapes (transformers Qwen3Config fields) and the run each is meant for.
PRESETS = {
    "tiny": dict(
        model=dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        ),
        batch=2,
        seq=32,
        dtype="float32",
        r=8,
        r_spectral=16,
        steps=5,
        warmup=1,
    ),
    "cpu-medium": dict(
        model=dict(
            vocab_size=8192,  # the lm_head's share of the compute is about Qwen3-0.6B's (a quarter)
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
        ),
        batch=2,
        seq=256,
        dtype="float32",
        r=16,
        r_spectral=128,
        steps=10,
        warmup=2,
    ),
    "qwen3-0.6b-shape": dict(
        model=dict(
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
        ),
        batch=4,
        seq=512,
        dtype="bfloat16",
        r=16,
        r_spectral=256,
        steps=20,
        warmup=3,
    ),
}


# --- model and data ---------------------------------------------------------------------------


def make_model(preset: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A random Qwen3ForCausalLM of the preset's shape, built directly on `device` in `dtype`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        **PRESETS[preset]["model"],
        max_position_embeddings=4096,
        tie_word_embeddings=True,  # as Qwen3-0.6B
        attention_dropout=0.0,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg)
    model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train()


def token_batch(vocab: int, batch: int, seq: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


def calibration_batches(ids: torch.Tensor) -> list[dict]:
    """The step's batch, one row per batch (PEFT's CorDA hook takes one sequence at a time)."""
    return [{"input_ids": row[None], "attention_mask": torch.ones_like(row[None])} for row in ids]


# --- configurations ---------------------------------------------------------------------------


@dataclass
class Row:
    """One configuration: how to build it on a fresh copy, and what was measured."""

    key: str
    variant: str  # spec name, or "limit"
    library: str  # "limit", "PEFT", "lora-lite"
    label: str
    rank: int | None
    targets: list[str]
    attach: Callable[[nn.Module], nn.Module] | None  # copy -> model to train (timed)
    step: bool = True  # False: attach time only
    compiled: bool = False  # the model runs under torch.compile
    model: nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    attach_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    peak_step_bytes: list[int] = field(default_factory=list)
    resident_bytes: int = 0
    trainable: int = 0
    trainable_dtype: str | None = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peft_attacher(twin: Twin, cfg, targets: list[str], calib: list[dict]):
    """A function that puts PEFT's twin of `cfg` on a copy (its EVA or CorDA init on `calib`)."""

    def attach(model: nn.Module) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return twin.attach(model, cfg, targets, calib, progress=False)[0]

    return attach


def ll_attacher(name: str, adapter_dtype: torch.dtype, calib: list[dict], wanda: bool = False, **over):
    """ll.attach on a copy; calibration data only where the spec requires it (or `wanda`: optional too)."""

    def attach(model: nn.Module) -> nn.Module:
        cfg = ll.from_spec(name, dtype=adapter_dtype, **over)
        needs = cfg.variant().CALIBRATION
        data = calib if needs == "required" or (wanda and needs == "optional") else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rank clamps on small models
            ll.attach(model, cfg, calibration_data=data, progress=False)
        return model

    return attach


def ll_overrides(name: str, r: int, r_spectral: int) -> dict:
    """The hyperparameters both libraries get: r (and alpha = 2r where the spec has alpha) for the
    variants with a rank, group size 32 for RoAd (it divides every preset's q/v outputs; the cost
    does not depend on it), the spec's defaults otherwise; the AntiPaSTO family at r_spectral."""
    if name in FAMILY:
        return dict(r=r_spectral)  # other hyperparameters at the spec's defaults
    bounds = ll.variant_module(name).BOUNDS
    if "r" in bounds:
        return dict(r=r, alpha=2.0 * r) if "alpha" in bounds else dict(r=r)
    return dict(group_size=32) if name == "road" else {}


def target_names(base: nn.Module, cfg) -> list[str]:
    """The full module names `cfg` adapts on `base` (PEFT gets exactly these)."""
    return list(ll.runtime.find_targets(base, cfg))


def short(names: list[str]) -> list[str]:
    """Leaf names of module names, for the report: ["q_proj", "v_proj"]."""
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def peft_family_refs(r: int, adapter_dtype: torch.dtype) -> list[tuple]:
    """(key, label, attach, also time steps): PEFT's PiSSA (full SVD, 4 power iterations) and
    CorDA inits at the AntiPaSTO family's rank, built as the twins of pissa and corda_lora."""
    pissa = ll.from_spec("pissa", r=r, alpha=2.0 * r, dtype=adapter_dtype)
    corda = ll.from_spec("corda_lora", r=r, alpha=2.0 * r, dtype=adapter_dtype)
    niter4 = Twin(lambda c, t: peft_lora(c, t, init_lora_weights="pissa_niter_4"))
    return [
        ("peft:pissa_full@rs", "PiSSA init, full SVD", TWINS["pissa"], pissa, True),
        ("peft:pissa_niter4@rs", "PiSSA init, 4 power iterations", niter4, pissa, False),
        ("peft:corda@rs", "CorDA init (IPM)", TWINS["corda_lora"], corda, False),
    ]


def compiled_rows(rows: list[Row], backend: str) -> list[Row]:
    """A torch.compile'd copy of the limit and of each shared variant's PEFT and lora-lite rows."""

    def compiling(attach: Callable | None) -> Callable:
        def build(model: nn.Module) -> nn.Module:
            if attach is None:  # the limit, as attach_all sets it up
                model.enable_input_require_grads()
            else:
                model = attach(model)
            return torch.compile(model, backend=backend)

        return build

    out = []
    for row in rows:
        if row.step and (row.key == "limit" or row.variant in SHARED):
            key, label = f"{row.key}+compiled", f"{row.label} (compiled)"  # fresh measurement lists
            attach = compiling(row.attach)
            out.append(Row(key, row.variant, row.library, label, row.rank, row.targets, attach, compiled=True))
    return out


def build_rows(variants: list[str], r: int, r_spectral: int, adapter_dtype: torch.dtype, calib, base) -> list[Row]:
    """The limit, then PEFT and lora-lite per shared variant, then the family with PEFT's inits.
    Both libraries of a pair get one lora-lite config and the modules it targets on `base`."""
    rows = [Row("limit", "limit", "limit", "limit", None, [], None)]
    for name in (n for n in variants if n in SHARED):
        cfg = ll.from_spec(name, dtype=adapter_dtype, **ll_overrides(name, r, r_spectral))
        targets = target_names(base, cfg)
        rank = getattr(cfg, "r", None)
        peft_attach = peft_attacher(TWINS[name], cfg, targets, calib)
        ll_attach = ll_attacher(name, adapter_dtype, calib, **ll_overrides(name, r, r_spectral))
        rows.append(Row(f"peft:{name}", name, "PEFT", TITLES[name], rank, short(targets), peft_attach))
        rows.append(Row(f"ll:{name}", name, "lora-lite", TITLES[name], rank, short(targets), ll_attach))
    family = [n for n in variants if n in FAMILY]
    if family:
        for key, label, twin, cfg, step in peft_family_refs(r_spectral, adapter_dtype):
            attach = peft_attacher(twin, cfg, target_names(base, cfg), calib)
            rows.append(Row(key, "family-ref", "PEFT", f"{label} (r={r_spectral})", r_spectral, QV, attach, step))
        # lora-lite's partner of PEFT's pissa_niter_4 (pissa's svd_niter): attach only
        attach = ll_attacher("pissa", adapter_dtype, calib, r=r_spectral, alpha=2.0 * r_spectral, svd_niter=4)
        label = f"PiSSA init, 4 power iterations (r={r_spectral})"
        rows.append(Row("ll:pissa_niter4@rs", "family-ref", "lora-lite", label, r_spectral, QV, attach, False))
    for name in family:
        attach = ll_attacher(name, adapter_dtype, calib, r=r_spectral)
        rows.append(Row(f"ll:{name}", name, "lora-lite", TITLES[name], r_spectral, QV, attach))
        if name == "antipasto":  # the optional Wanda re-selection costs a calibration pass: attach only
            attach = ll_attacher(name, adapter_dtype, calib, wanda=True, r=r_spectral)
            label = "AntiPaSTO + Wanda re-selection"
            rows.append(Row("ll:antipasto+wanda", "antipasto+wanda", "lora-lite", label, r_spectral, QV, attach, False))
    return rows


# --- measurement ------------------------------------------------------------------------------


def resident_bytes(model: nn.Module, opt: torch.optim.Optimizer | None) -> int:
    """Bytes of the configuration's own tensors: parameters, buffers, optimiser state (storages once)."""
    seen: dict[int, int] = {}
    tensors = list(model.parameters()) + list(model.buffers())
    if opt is not None:
        tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def train_step(row: Row, ids: torch.Tensor) -> None:
    if row.opt is not None:
        row.opt.zero_grad(set_to_none=True)
    loss = row.model(input_ids=ids, labels=ids, use_cache=False).loss  # training: no KV cache (it recompiles per layer)
    loss.backward()
    if row.opt is not None:
        row.opt.step()


def timed_step(row: Row, ids: torch.Tensor, device: torch.device) -> tuple[float, int | None]:
    """(seconds, peak bytes above the step's start on CUDA, else None)."""
    if row.opt is not None:
        row.opt.zero_grad(set_to_none=True)
    sync(device)
    before = None
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    train_step(row, ids)
    sync(device)
    t = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) - before if before is not None else None
    return t, peak


def cpu_step_peak_bytes(row: Row, ids: torch.Tensor) -> int | None:
    """Highest CPU allocation above the step's start, from torch.profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    if row.opt is not None:
        row.opt.zero_grad(set_to_none=True)
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(row, ids)
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # profiler internals moved: no CPU memory figure rather than a wrong one
        return None
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            cur += e.nbytes()
            peak = max(peak, cur)
    return peak


def warm_up(base: nn.Module, ids: torch.Tensor, device: torch.device) -> None:
    """One-off costs before anything is timed: a forward, and the linear algebra inits use."""
    with torch.no_grad():
        base(input_ids=ids[:1])
        a = torch.randn(64, 48, device=device)
        torch.linalg.svd(a, full_matrices=False)
        torch.svd_lowrank(a, q=8, niter=2)
        torch.linalg.qr(a)
        c = a.T @ a + torch.eye(48, device=device)
        torch.linalg.eigh(c)
        torch.linalg.cholesky(c)
        torch.linalg.solve_triangular(torch.triu(c), c, upper=True)
        torch.linalg.inv(c)
    sync(device)


def attach_all(rows: list[Row], base: nn.Module, reps: int, device: torch.device, log) -> None:
    """Time each row's attach on `reps` fresh copies (interleaved); keep the last copy for steps."""
    for rep in range(reps):
        for row in rows:
            if row.attach is None:
                continue
            last = rep == reps - 1
            model = copy.deepcopy(base)
            gc.collect()
            sync(device)
            t0 = time.perf_counter()
            model = row.attach(model)
            sync(device)
            row.attach_s.append(time.perf_counter() - t0)
            if last and row.step:
                row.model = model.train()
            else:
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        log(f"  attach repetition {rep + 1}/{reps} done")
    for row in rows:
        if row.attach is None:  # the limit: the base itself, input embeddings' output needing grad
            row.model = base
            base.enable_input_require_grads()
        if row.model is None:
            continue
        params = [p for p in row.model.parameters() if p.requires_grad]
        row.trainable = sum(p.numel() for p in params)
        row.trainable_dtype = str(params[0].dtype).removeprefix("torch.") if params else None
        row.opt = torch.optim.AdamW(params, lr=1e-4) if params else None


def run_steps(rows: list[Row], ids: torch.Tensor, steps: int, warmup: int, device: torch.device, log) -> None:
    active = [r for r in rows if r.model is not None]
    gc.collect()
    gc.disable()  # no collector pauses inside timed steps (autograd frees by reference counting)
    try:
        for i in range(warmup + steps):
            k = i % len(active)
            for row in active[k:] + active[:k]:
                t, peak = timed_step(row, ids, device)
                if i >= warmup:
                    row.step_s.append(t)
                    if peak is not None:
                        row.peak_step_bytes.append(peak)
            log(f"  step {i + 1}/{warmup + steps}{' (warm-up)' if i < warmup else ''} done")
    finally:
        gc.enable()
    for row in active:
        if device.type == "cpu":
            p = cpu_step_peak_bytes(row, ids)
            if p is not None:
                row.peak_step_bytes.append(p)
        row.resident_bytes = resident_bytes(row.model, row.opt)


# --- statistics and report --------------------------------------------------------------------


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(p25, median, p75); for fewer than two values all three are the value."""
    if len(xs) < 2:
        return (xs[0], xs[0], xs[0])
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return (q[0], statistics.median(xs), q[2])


def paired(a: Row, b: Row) -> dict | None:
    """Ratio a/b of step times within each repetition: median and quartiles."""
    if not a.step_s or not b.step_s:
        return None
    p25, med, p75 = quartiles([x / y for x, y in zip(a.step_s, b.step_s)])
    return {"median": med, "p25": p25, "p75": p75, "of_mins": min(a.step_s) / min(b.step_s)}


def peak_mb(row: Row) -> float | None:
    if not row.peak_step_bytes:
        return None
    return (row.resident_bytes + max(row.peak_step_bytes)) / 2**20


def summarise(rows: list[Row]) -> list[dict]:
    by = {r.key: r for r in rows}
    out = []
    for row in rows:
        suffix = "+compiled" if row.compiled else ""  # compiled rows are compared with compiled rows
        limit = by["limit" + suffix]
        d = {
            "key": row.key,
            "variant": row.variant,
            "library": row.library,
            "label": row.label,
            "compiled": row.compiled,
            "rank": row.rank,
            "targets": row.targets,
            "trainable": row.trainable,
            "trainable_dtype": row.trainable_dtype,
            "attach_s": row.attach_s,
            "attach_min_s": min(row.attach_s) if row.attach_s else None,
            "attach_median_s": statistics.median(row.attach_s) if row.attach_s else None,
            "step_s": row.step_s,
            "peak_mb": peak_mb(row),
            "resident_mb": row.resident_bytes / 2**20 if row.model is not None else None,
        }
        if row.step_s:
            p25, med, p75 = quartiles(row.step_s)
            d |= {"step_median_ms": 1e3 * med, "step_min_ms": 1e3 * min(row.step_s), "spread": (p75 - p25) / med}
            d["vs_limit"] = paired(row, limit) if row is not limit else None
        peer = by.get(f"peft:{row.variant}{suffix}") if row.library == "lora-lite" else None
        d["vs_peft"] = paired(row, peer) if peer else None
        if peer and d["peak_mb"] and peak_mb(peer):
            d["peak_vs_peft"] = d["peak_mb"] / peak_mb(peer)
        out.append(d)
    return out


def fmt_ratio(p: dict | None) -> str:
    return "" if not p else f"{p['median']:.2f} [{p['p25']:.2f}, {p['p75']:.2f}]"


def fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown(summary: list[dict], meta: dict, settings: dict, checks: list[dict]) -> str:
    s = settings
    lines = [
        f"# Speed: lora-lite vs PEFT vs the frozen-base limit ({s['model']}, {s['device']})",
        "",
        f"{meta['date']}, {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"peft {meta['peft']}, lora-lite {meta['lora_lite']} ({meta['git']}).",
        f"Random Qwen3 ({s['model_shape']}), batch {s['batch']} x {s['seq']} tokens, model {s['dtype']}, "
        f"adapters {s['adapter_dtype']}; r={s['r']} (shared variants), r={s['r_spectral']} (AntiPaSTO family); "
        f"{s['steps']} timed steps after {s['warmup']} warm-up, interleaved; "
        f"attach: the fastest of {s['attach_reps']} fresh copies.",
        "",
        "Step = forward + causal-LM loss + backward + AdamW. `spread` = interquartile range / median of the "
        "step times. Ratios are paired per repetition: median [p25, p75]. "
        f"Peak memory: {s['memory_method']}.",
        "",
    ]
    if s.get("compile_backend"):
        lines += [
            f"Rows marked (compiled) run under torch.compile (backend {s['compile_backend']}, compiled during the "
            "warm-up); their / PEFT and / limit ratios are to the compiled PEFT row and the compiled limit.",
            "",
        ]
    lines += [
        "| variant | library | trainable | step median (ms) | step min (ms) | spread | peak (MB) | attach, min (s) "
        "| / PEFT | / limit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for d in summary:
        if not d["step_s"]:
            continue
        lib = "frozen base" if d["library"] == "limit" else d["library"]
        lines.append(
            f"| {d['label']} | {lib} | {d['trainable']:,} | {d['step_median_ms']:.1f} | {d['step_min_ms']:.1f} | "
            f"{100 * d['spread']:.1f}% | {fmt(d['peak_mb'], '.1f')} | {fmt(d['attach_min_s'], '.3f')} | "
            f"{fmt_ratio(d['vs_peft'])} | {fmt_ratio(d['vs_limit'])} |"
        )
    fam = [d for d in summary if d["variant"] in FAMILY + ["family-ref", "antipasto+wanda"]]
    if fam:
        ref = next((d for d in summary if d["key"] == "peft:pissa_full@rs"), None)
        corda = next((d for d in summary if d["key"] == "peft:corda@rs"), None)
        lines += [
            "",
            f"Attach at r={s['r_spectral']} on {', '.join(QV)} of every layer. Calibration data (the step's "
            "batch, one row at a time) only where the method requires it (AntiPaSTO-CorDA, PEFT's CorDA), "
            "and for the AntiPaSTO + Wanda row:",
            "",
            "| init | library | attach, min (s) | / PEFT PiSSA full SVD | / PEFT CorDA |",
            "|---|---|---:|---:|---:|",
        ]
        for d in fam:
            t = d["attach_min_s"]
            vs_pissa = t / ref["attach_min_s"] if ref else None
            vs_corda = t / corda["attach_min_s"] if corda else None
            lines.append(
                f"| {d['label']} | {d['library']} | {t:.3f} | {fmt(vs_pissa, '.2f')} | {fmt(vs_corda, '.2f')} |"
            )
    if checks:
        lines += ["", "Targets (issue 7):", "", "| target | measured | status |", "|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['target']} | {c['measured']} | {c['status']} |")
    return "\n".join(lines) + "\n"


def status(p: dict | None, bound: float) -> str:
    """met: median ratio <= bound; within noise: the lower quartile is; missed otherwise."""
    if p is None:
        return "n/a"
    if p["median"] <= bound:
        return "met"
    return "within noise" if p["p25"] <= bound else "missed"


def step_ratio(a: dict, b: dict) -> dict:
    """Paired ratio of two summary rows' step times (per repetition): median and quartiles."""
    p25, med, p75 = quartiles([x / y for x, y in zip(a["step_s"], b["step_s"])])
    return {"median": med, "p25": p25, "p75": p75}


def target_checks(summary: list[dict]) -> list[dict]:
    """The issue's targets, each as measured in this run: met, within noise, or missed."""
    by = {d["key"]: d for d in summary}
    checks = []

    def timing(target: str, p: dict, bound: float) -> None:
        checks.append({"target": target, "measured": fmt_ratio(p), "status": status(p, bound), "ratio": p})

    def scalar(target: str, m: float, bound: float, measured: str) -> None:
        checks.append({"target": target, "measured": measured, "status": "met" if m <= bound else "missed", "ratio": m})

    for name in SHARED:
        d = by.get(f"ll:{name}")
        if d and d.get("vs_peft"):
            timing(f"{TITLES[name]}: step <= 1.0x PEFT", d["vs_peft"], 1.0)
        if d and d.get("peak_vs_peft") is not None:  # allocator bytes are deterministic: 0.5% slack
            scalar(f"{TITLES[name]}: peak memory <= PEFT", d["peak_vs_peft"], 1.005, f"{d['peak_vs_peft']:.3f}")
    for name in ("lora", "ia3", "ia3_ff"):
        d = by.get(f"ll:{name}")
        if d and d.get("vs_limit"):
            timing(f"{TITLES[name]}: step <= 1.15x limit", d["vs_limit"], 1.15)
    if by.get("ll:hra") and by.get("ll:lora"):
        timing("HRA: step <= 1.5x our LoRA", step_ratio(by["ll:hra"], by["ll:lora"]), 1.5)
        if by.get("peft:hra") and by.get("peft:lora"):
            p = step_ratio(by["peft:hra"], by["peft:lora"])
            checks.append({"target": "(context) PEFT's HRA / PEFT's LoRA", "measured": fmt_ratio(p), "status": ""})
    for name in FAMILY:
        d = by.get(f"ll:{name}")
        if d and d.get("vs_limit"):
            timing(f"{TITLES[name]}: step <= 1.3x limit", d["vs_limit"], 1.3)
        # the SVD-only inits against PEFT's PiSSA; the calibrated CorDA one against PEFT's CorDA
        ref_key, ref_name = ("peft:corda@rs", "CorDA") if name == "antipasto_corda" else ("peft:pissa_full@rs", "PiSSA")
        ref = by.get(ref_key)
        if d and ref:
            m = d["attach_min_s"] / ref["attach_min_s"]
            measured = f"{m:.2f} ({d['attach_min_s']:.3g} s vs {ref['attach_min_s']:.3g} s)"
            scalar(f"{TITLES[name]}: attach <= PEFT {ref_name} init", m, 1.0, measured)
    return checks


def machine_line(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    line = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        line = f"{torch.cuda.get_device_name(device)}; host {line}"
    return line


def git_rev() -> str:
    """The checkout this script is in: short commit, '-dirty' when tracked files differ from it."""
    try:
        root = Path(__file__).resolve().parents[1]
        cmd = ["git", "describe", "--always", "--dirty", "--abbrev=7"]
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", help="model dtype (default: the preset's; float32 or bfloat16)")
    ap.add_argument("--adapter-dtype", help="adapter tensors' dtype for both libraries (default: the model's)")
    ap.add_argument("--batch", type=int, help="sequences per batch (default: the preset's)")
    ap.add_argument("--seq", type=int, help="tokens per sequence (default: the preset's)")
    ap.add_argument("--steps", type=int, help="timed steps per configuration (default: the preset's)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default: the preset's)")
    ap.add_argument("--attach-reps", type=int, default=2, help="fresh copies each attach is timed on")
    ap.add_argument("--variants", default=",".join(SHARED + FAMILY), help="comma-separated spec names")
    ap.add_argument("--r", type=int, help="rank of the shared low-rank variants (default: the preset's)")
    ap.add_argument("--r-spectral", type=int, help="rank of the AntiPaSTO family (default: the preset's)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    ap.add_argument("--compile", action="store_true", help="also time the limit and shared variants compiled")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    ap.add_argument(
        "--out",
        default="bench-out/speed",
        help="folder for the .md and .json (committed results live in benchmarks/results)",
    )
    ap.add_argument("--tag", default="", help="suffix for the output files' names")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    preset = PRESETS[a.model]
    for k in ("dtype", "batch", "seq", "steps", "warmup", "r", "r_spectral"):
        if getattr(a, k) is None:
            setattr(a, k, preset[k])
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in SHARED + FAMILY]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {SHARED + FAMILY}")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.compile:
        a.warmup = max(a.warmup, 1)  # the compile happens in the first step
    device = torch.device(a.device)
    dtype = ll.config.as_dtype(a.dtype)
    adapter_dtype = ll.config.as_dtype(a.adapter_dtype or a.dtype)
    log = (lambda msg: None) if a.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))

    t_start = time.perf_counter()
    base = make_model(a.model, device, dtype)
    ids = token_batch(preset["model"]["vocab_size"], a.batch, a.seq, device)
    calib = calibration_batches(ids)
    rows = build_rows(variants, a.r, a.r_spectral, adapter_dtype, calib, base)
    if a.compile:
        rows += compiled_rows(rows, a.compile_backend)
    log(f"{len(rows)} configurations on {a.model} ({device}, {dtype}); attaching")
    warm_up(base, ids, device)
    attach_all(rows, base, a.attach_reps, device, log)
    log("timing steps")
    run_steps(rows, ids, a.steps, a.warmup, device, log)

    import peft
    import transformers

    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_line(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lora_lite": ll.__version__,
        "git": git_rev(),
        "lora_lite_path": str(Path(ll.__file__).parent),
        "wall_s": None,
    }
    m = preset["model"]
    settings = {
        "model": a.model,
        "model_shape": f"hidden {m['hidden_size']}, intermediate {m['intermediate_size']}, "
        f"{m['num_hidden_layers']} layers, {m['num_attention_heads']}/{m['num_key_value_heads']} heads x "
        f"{m['head_dim']}, vocab {m['vocab_size']:,}",
        "model_config": m,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "adapter_dtype": str(adapter_dtype).removeprefix("torch."),
        "batch": a.batch,
        "seq": a.seq,
        "steps": a.steps,
        "warmup": a.warmup,
        "attach_reps": a.attach_reps,
        "r": a.r,
        "r_spectral": a.r_spectral,
        "variants": variants,
        "compile_backend": a.compile_backend if a.compile else None,
        "memory_method": (
            "CUDA max_memory_allocated above the step's start + the configuration's resident tensors"
            if device.type == "cuda"
            else "CPU allocator bytes from torch.profiler memory events (one profiled step) above the step's start "
            "+ the configuration's resident tensors (parameters, buffers, AdamW state)"
        ),
    }
    summary = summarise(rows)
    checks = target_checks(summary)
    meta["wall_s"] = time.perf_counter() - t_start
    md = markdown(summary, meta, settings, checks)
    print(md)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"speed-{a.model}-{device.type}-{settings['dtype']}" + (f"-{a.tag}" if a.tag else "")
    (out / f"{stem}.md").write_text(md)
    payload = {"meta": meta, "settings": settings, "rows": summary, "targets": checks}
    tmp = out / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=False))
    tmp.replace(out / f"{stem}.json")
    log(f"wrote {out / stem}.md and .json ({meta['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
