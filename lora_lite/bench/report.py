"""results.json, results.md and loss.png of a bench run (rewritten after every run).

results.json: a list of records, one per run, each with "variant" and "library" ("lora-lite"
or "peft"). results.md: the settings line, then one row per variant, its PEFT twin's numbers and
the difference on the same row. loss.png: the training loss of each variant, its twin beside it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import lora_lite as ll

LIBRARIES = ("lora-lite", "peft")


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def title(variant: str) -> str:
    """The spec's display title (LoRA, IA3-FF, ...), or the name itself for an unknown spec."""
    try:
        return ll.variant_module(variant).TITLE
    except Exception:  # a record of a spec this checkout does not ship
        return variant


def pairs(records: list[dict]) -> list[tuple[str, dict | None, dict | None]]:
    """(variant, lora-lite record, PEFT record) in order of first appearance; records written
    before the "library" field are lora-lite's."""
    by: dict[str, dict] = {}
    for r in records:
        by.setdefault(r["variant"], {})[r.get("library", "lora-lite")] = r
    return [(v, d.get("lora-lite"), d.get("peft")) for v, d in by.items()]


def attach_cell(r: dict | None) -> str:
    """Attach seconds, split into calibration + build where recorded."""
    if r is None:
        return ""
    if "build_s" not in r:
        return f"{r['attach_s']:.2f}"
    return f"{r['calibration_s'] + r['build_s']:.2f} ({r['calibration_s']:.2f} + {r['build_s']:.2f})"


def cell(r: dict | None, key: str, fmt: str) -> str:
    """r[key] formatted, or "" when there is no record or no value."""
    return "" if r is None or r.get(key) is None else format(r[key], fmt)


def row(variant: str, a: dict | None, p: dict | None, with_peft: bool) -> str:
    """One markdown row: lora-lite's numbers, then PEFT's and the difference of answer NLL."""
    base = a or p
    cells = [title(variant), cell(base, "eval_nll_before", ".3f"), cell(a, "eval_nll_after", ".3f")]
    cells.append(f"{a['eval_nll_after'] - a['eval_nll_before']:+.3f}" if a else "")
    if with_peft:
        cells.append(cell(p, "eval_nll_after", ".3f"))
        cells.append(f"{a['eval_nll_after'] - p['eval_nll_after']:+.3f}" if a and p else "")
    keys = [("accuracy", ".1%"), ("trainable_params", ","), ("step_ms", ".0f"), ("peak_mem_gb", ".2f")]
    for key, fmt in keys:
        cells.append(cell(a, key, fmt) + (f" / {cell(p, key, fmt)}" if with_peft and p else ""))
    cells.append(attach_cell(a) + (f" / {attach_cell(p)}" if with_peft and p else ""))
    cells.append(cell(a, "reload_max_abs_diff", ".1e") + (f" / {cell(p, 'reload_max_abs_diff', '.1e')}" if p else ""))
    return "| " + " | ".join(cells) + " |"


def markdown_table(records: list[dict]) -> str:
    """The results table: one row per variant; with PEFT records, PEFT's numbers on the same
    row ("lora-lite / PEFT") and the answer-NLL difference lora-lite - PEFT."""
    with_peft = any(r.get("library") == "peft" for r in records)
    cols = ["Variant", "answer NLL before", "after"] + (
        ["change", "PEFT after", "lora-lite - PEFT"] if with_peft else ["change"]
    )
    cols += ["accuracy", "Params", "step ms", "peak mem GB", "attach s (calibration + build)", "reload diff"]
    if with_peft:
        cols = [c + " (lora-lite / PEFT)" if i > 5 else c for i, c in enumerate(cols)]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join(row(v, a, p, with_peft) + "\n" for v, a, p in pairs(records))


def settings_line(r: dict) -> str:
    """Data source, model and settings of a record, as one sentence (the results header)."""
    s = r["settings"]
    lr = f"lr {s['lr']:g}" if s.get("lr") else f"lr: the spec's, at least {s.get('lr_floor') or 0:g}"
    twins = f" PEFT {r['versions']['peft']} twins on the same batches." if s.get("peft") else ""
    return (
        f"Model: {r['model']}. Data: {r['data']}. {s['steps']} steps, batch {s['batch_size']}, "
        f"seq {s['seq_len']}, eval {s['eval_samples']} questions, generation {s['gen_samples']} "
        f"(max {s.get('max_new_tokens', '?')} new tokens), device {r['device']}, dtype {s['dtype']}, "
        f"seed {s['seed']}, {lr}.{twins}"
    )


def short_title(r: dict) -> str:
    """The figure title: model, data source and settings."""
    s = r["settings"]
    lr = f"lr {s['lr']:g}" if s.get("lr") else f"spec lr, floor {s.get('lr_floor') or 0:g}"
    return (
        f"{r['model']}\n{r['data']}; {s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens, "
        f"{lr}, eval {s['eval_samples']}, seed {s['seed']}, {r['device']}"
    )


def smooth(xs: list[float], k: int = 8) -> list[float]:
    """Running mean over the last `k` values."""
    return [sum(xs[max(0, i - k + 1) : i + 1]) / len(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


def plot_pair(ax, variant: str, a: dict | None, p: dict | None) -> None:
    """One panel: lora-lite's loss solid, PEFT's dashed (running mean of 8, raw values faint)."""
    parts = []
    for r, style, lib in ((a, "-", "lora-lite"), (p, "--", "PEFT")):
        if r is None:
            continue
        steps = range(1, len(r["losses"]) + 1)
        (line,) = ax.plot(steps, smooth(r["losses"]), style, lw=1.3, label=lib, color="C0" if lib == "PEFT" else "C3")
        ax.plot(steps, r["losses"], color=line.get_color(), lw=0.5, alpha=0.25)
        parts.append(f"{lib} {r['eval_nll_after']:.3f}")
    ax.set_title(f"{title(variant)}: {', '.join(parts)}", fontsize=8)
    ax.tick_params(labelsize=7)


def plot(out: Path, records: list[dict]) -> None:
    """loss.png: one panel per variant with its PEFT twin (titles: answer NLL after)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    groups = pairs(records)
    ncols = min(4, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.5 * nrows + 0.8), squeeze=False, sharey=True)
    for ax, (v, a, p) in zip(axes.flat, groups):
        plot_pair(ax, v, a, p)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    fig.supxlabel("step", fontsize=8)
    fig.supylabel("train loss, answer NLL/token (mean of 8)", fontsize=8)
    fig.suptitle(short_title(records[0]), fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)


def write_outputs(out: Path, records: list[dict]) -> None:
    """results.json (atomic), results.md and loss.png in `out`."""
    write_json_atomic(out / "results.json", records)
    if records:
        (out / "results.md").write_text(f"{settings_line(records[0])}\n\n{markdown_table(records)}", encoding="utf-8")
        plot(out, records)
