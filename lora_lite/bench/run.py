"""One run: attach (lora-lite or PEFT), train, evaluate, reload-check, give the base model back.

    attach (calibration rows from their own stream)  -> calibration_s, build_s
    -> AdamW over the trainable tensors for `steps` steps on the shared batch order
    -> eval_nll_after (answer NLL on held-out questions), accuracy (greedy, gen_samples)
    -> save, detach / unload, load, compare logits (reload_max_abs_diff)
    -> base weights restored; before every run they must be bit-identical to the loaded model's

Both libraries get the same model object, batches, seed, learning rate and steps.
"""

from __future__ import annotations

import hashlib
import math
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import lora_lite as ll

from .data import Dataset, TrainOrder, calibration_rows
from .evaluate import Env, accuracy, answer_nll_sum, eval_nll, logits_of


@dataclass
class Bench:
    """State shared by all runs of one bench invocation."""

    model: torch.nn.Module
    env: Env
    data: Dataset
    log: Callable[[str], None]
    model_desc: str = ""
    nll_before: float = float("nan")
    fingerprint: dict | None = None  # name -> digest of every parameter and buffer, at load


def fingerprint(model: torch.nn.Module) -> dict[str, str]:
    """A digest of the bits of every parameter and buffer (state_dict keys)."""
    out = {}
    for name, t in model.state_dict().items():
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        out[name] = hashlib.blake2b(raw.tobytes(), digest_size=16).hexdigest()
    return out


def check_base(b: Bench) -> None:
    """Raise RuntimeError naming the first tensor whose bits differ from the loaded model's."""
    now = fingerprint(b.model)
    bad = [k for k in b.fingerprint if now.get(k) != b.fingerprint[k]] + sorted(set(now) - set(b.fingerprint))
    if bad:
        raise RuntimeError(f"base model changed before this run: {bad[0]} differs from the loaded model")


def snapshot(b: Bench, cfg) -> dict[str, torch.Tensor]:
    """Copies of the target weights of `cfg` (restored after each run)."""
    return {n: m.weight.detach().clone() for n, m in ll.runtime.find_targets(b.model, cfg).items()}


def weight_change(b: Bench, saved: dict[str, torch.Tensor]) -> float:
    """The largest |W now - W saved| over the saved target weights."""
    modules = dict(b.model.named_modules())
    return max((float((modules[n].weight.float() - w.float()).abs().max()) for n, w in saved.items()), default=0.0)


def restore(b: Bench, saved: dict[str, torch.Tensor]) -> float:
    """Copy the saved target weights back; returns the largest change that undid."""
    modules, diff = dict(b.model.named_modules()), weight_change(b, saved)
    with torch.no_grad():
        for n, w in saved.items():
            modules[n].weight.copy_(w)
    return diff


def calibration_batches(b: Bench, name: str) -> list[dict] | None:
    """Calibration batches (no labels) for a variant that takes them, else None."""
    if ll.variant_module(name).CALIBRATION == "none":
        return None
    cfg = b.env.cfg
    picks = calibration_rows(len(b.data.train), cfg.batch_size * cfg.calib_batches, cfg.seed)
    rows = [b.data.train[j] for j in picks]
    return [b.env.batch(rows[i : i + cfg.batch_size], labels=False) for i in range(0, len(rows), cfg.batch_size)]


class TimedBatches:
    """Iterable over calibration batches that notes when it is exhausted (calibration ends)."""

    def __init__(self, batches: list):
        self.batches, self.done = batches, None

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        yield from self.batches
        self.done = time.perf_counter()


def sync(device) -> None:
    """Wait for queued CUDA work, so step times are real (no-op on the CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def train(b: Bench, model, label: str, lr: float) -> tuple[list[float], list[float]]:
    """AdamW over `model`'s trainable tensors on the shared batch order; (losses, step ms)."""
    cfg, env = b.env.cfg, b.env
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order, losses, step_ms = TrainOrder(len(b.data.train), cfg.seed), [], []
    model.train()
    for step in tqdm(range(cfg.steps), desc=f"train {label}", unit="step", leave=False):
        batch = env.batch([b.data.train[i] for i in order.batch(step, cfg.batch_size)])
        t1 = time.perf_counter()
        with env.autocast():
            s, n = answer_nll_sum(model, batch)
            loss = s / max(n, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(env.device)
        step_ms.append((time.perf_counter() - t1) * 1e3)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{label}: training loss is {losses[-1]} at step {step + 1} (lr {lr:g})")
    return losses, step_ms


def peak_mem_gb(device) -> float:
    """CUDA: peak allocated since the run started; CPU: the process's maximum RSS so far."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB (Linux), process-wide


def probe_logits(b: Bench, model) -> torch.Tensor:
    """fp32 logits (B, T, V) on the first four test questions, for the reload check."""
    batch = b.env.batch(b.data.test[:4])
    model.eval()
    with torch.no_grad():
        return logits_of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])).float()


def measure(b: Bench, model, label: str, losses_ms: tuple) -> dict:
    """The record's measures after training (answer NLL, accuracy, step time, memory)."""
    cfg, (losses, step_ms) = b.env.cfg, losses_ms
    nll_after = eval_nll(model, b.env, b.data.test[: cfg.eval_samples], f"eval {label}")
    acc = accuracy(model, b.env, b.data.test[: cfg.gen_samples], f"generate {label}")
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(
        eval_nll_before=b.nll_before,
        eval_nll_after=nll_after,
        accuracy=acc,
        trainable_params=n_params,
        step_ms=statistics.median(step_ms) if step_ms else 0.0,
        peak_mem_gb=peak_mem_gb(b.env.device),
        losses=losses,
    )


def run_lora_lite(b: Bench, name: str) -> dict:
    """Attach, train, measure, save -> detach -> load check; the model is detached afterwards."""
    cfg, gen, settings = ll.from_spec(name), ll.variant_module(name), b.env.cfg
    calib, saved = calibration_batches(b, name), snapshot(b, ll.from_spec(name))
    timed = TimedBatches(calib) if calib is not None else None
    torch.manual_seed(settings.seed)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("default" if settings.verbose else "ignore")
        ll.attach(b.model, cfg, calibration_data=timed, progress=True)
    build_end = time.perf_counter()
    calibration_s = timed.done - t0 if timed is not None and timed.done else 0.0
    try:
        lr = settings.lr_for(gen.LR)
        rec = measure(b, b.model, gen.TITLE, train(b, b.model, gen.TITLE, lr))
        rec["reload_max_abs_diff"], rec["detach_weight_max_abs_diff"] = reload_lora_lite(b, name, saved)
    finally:
        if ll.state(b.model) is not None:
            ll.detach(b.model)
        restore(b, saved)  # crop in a low-precision dtype restores W within rounding: start the next run exact
    return dict(rec, calibration_s=calibration_s, build_s=build_end - t0 - calibration_s, lr=lr)


def reload_lora_lite(b: Bench, name: str, saved: dict) -> tuple[float, float]:
    """(max |logits after save -> detach -> load - before|, max |W after detach - W before|)."""
    bar = tqdm(total=4, desc=f"reload check {name}", leave=False)
    ref = probe_logits(b, b.model)
    ckpt = Path(b.env.cfg.out) / "adapters" / f"{ll.state(b.model).variant.NAME}.safetensors"
    ll.save(b.model, ckpt)
    bar.update()
    ll.detach(b.model)
    detach_diff = restore(b, saved)
    bar.update()
    ll.load(b.model, ckpt)
    bar.update()
    again = probe_logits(b, b.model)
    bar.update()
    bar.close()
    return float((again - ref).abs().max()), detach_diff


def run_peft(b: Bench, name: str) -> dict:
    """PEFT's twin of `name` on the same model, batches, seed, lr and steps; base restored after."""
    from .twins import TWINS

    cfg, gen, settings = ll.from_spec(name), ll.variant_module(name), b.env.cfg
    calib, saved = calibration_batches(b, name), snapshot(b, cfg)
    torch.manual_seed(settings.seed)
    t0 = time.perf_counter()
    holder = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default" if settings.verbose else "ignore")
            holder["pm"], calibration_s = TWINS[gen.NAME].attach(b.model, cfg, list(saved), calib)
        build_s = time.perf_counter() - t0 - calibration_s
        lr = settings.lr_for(gen.LR)
        rec = measure(b, holder["pm"], f"PEFT {gen.TITLE}", train(b, holder["pm"], f"PEFT {gen.TITLE}", lr))
        rec["reload_max_abs_diff"], rec["detach_weight_max_abs_diff"] = reload_peft(b, holder, saved)
    finally:
        unload_peft(b, holder)
        restore(b, saved)  # every target weight: PiSSA, OLoRA, CorDA leave W_res in the base after unload()
    return dict(rec, calibration_s=calibration_s, build_s=build_s, lr=lr)


def unload_peft(b: Bench, holder: dict) -> None:
    """Take PEFT's layers out of the model (the base weights are restored by the caller)."""
    pm = holder.pop("pm", None)
    if pm is not None:
        pm.unload()


def reload_peft(b: Bench, holder: dict, saved: dict) -> tuple[float, float]:
    """The reload check with PEFT's save_pretrained -> unload -> PeftModel.from_pretrained. PiSSA,
    OLoRA and CorDA leave W_res in the base after unload(): the adapter is loaded back onto that
    residual base, with init_lora_weights=True (no init re-run: CorDA's would need calibration)."""
    from peft import PeftConfig, PeftModel

    bar = tqdm(total=4, desc="reload check PEFT", leave=False)
    ref = probe_logits(b, holder["pm"])
    with tempfile.TemporaryDirectory() as d:
        holder["pm"].save_pretrained(d)
        bar.update()
        unload_peft(b, holder)
        detach_diff = weight_change(b, saved)
        bar.update()
        pcfg = PeftConfig.from_pretrained(d)
        if isinstance(getattr(pcfg, "init_lora_weights", None), str):  # a data-driven init: the saved tensors follow
            pcfg.init_lora_weights = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            holder["pm"] = PeftModel.from_pretrained(b.model, d, config=pcfg)
        bar.update()
        again = probe_logits(b, holder["pm"])
    bar.update()
    bar.close()
    return float((again - ref).abs().max()), detach_diff


def run_one(b: Bench, name: str, library: str) -> dict:
    """One record: check the base is bit-identical to the loaded one, run, time it."""
    check_base(b)
    if str(b.env.device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(b.env.device)
    t0 = time.perf_counter()
    rec = (run_peft if library == "peft" else run_lora_lite)(b, name)
    head = dict(variant=ll.variant_module(name).NAME, library=library, base_bit_identical_before=True)
    return dict(head, **rec, wall_s=time.perf_counter() - t0)
