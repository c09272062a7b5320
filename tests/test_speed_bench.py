"""benchmarks/speed.py end to end on the tiny model, one timed step, so the benchmark cannot rot.

Timings are not checked (they depend on the machine): only that every configuration ran, every
number in the JSON is finite, and the markdown table has its rows.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def load_speed():
    spec = importlib.util.spec_from_file_location("lora_lite_speed_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def numbers(obj):
    """Every int/float in a JSON value."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    else:
        for v in obj:
            yield from numbers(v)


def test_speed_bench_tiny_one_step(tmp_path, capsys):
    speed = load_speed()
    argv = ["--model", "tiny", "--steps", "1", "--warmup", "0", "--attach-reps", "1"]
    argv += ["--variants", "lora,hra,antipasto", "--out", str(tmp_path), "--quiet"]
    assert speed.main(argv) == 0
    printed = capsys.readouterr().out

    data = json.loads((tmp_path / "speed-tiny-cpu-float32.json").read_text())
    values = list(numbers(data))
    assert values and all(math.isfinite(v) for v in values)
    rows = {r["key"]: r for r in data["rows"]}
    timed = ["limit", "peft:lora", "ll:lora", "peft:hra", "ll:hra", "peft:pissa_full@rs", "ll:antipasto"]
    attach_only = ["peft:pissa_niter4@rs", "ll:pissa_niter4@rs", "peft:corda@rs", "ll:antipasto+wanda"]
    assert set(rows) == set(timed + attach_only)
    for key in timed:
        assert len(rows[key]["step_s"]) == 1 and rows[key]["step_median_ms"] > 0, key
        assert rows[key]["peak_mb"] > 0, key
    for key in timed[1:] + attach_only:
        assert rows[key]["attach_min_s"] > 0, key
    assert rows["ll:lora"]["trainable"] == rows["peft:lora"]["trainable"] > 0
    assert rows["ll:hra"]["trainable"] == rows["peft:hra"]["trainable"] > 0
    assert rows["ll:lora"]["vs_peft"]["median"] > 0 and rows["ll:lora"]["vs_limit"]["median"] > 0
    assert {c["status"] for c in data["targets"]} <= {"met", "within noise", "missed", ""}

    md = (tmp_path / "speed-tiny-cpu-float32.md").read_text()
    assert md.strip() == printed.strip()
    for row in ["| limit | frozen base |", "| LoRA | PEFT |", "| LoRA | lora-lite |", "| HRA | PEFT |"]:
        assert row in md, row
    for row in ["| HRA | lora-lite |", "| AntiPaSTO | lora-lite |", "| PiSSA init, full SVD (r=16) | PEFT |"]:
        assert row in md, row
    for row in [
        "| PiSSA init, 4 power iterations (r=16) | PEFT |",
        "| PiSSA init, 4 power iterations (r=16) | lora-lite |",
    ]:
        assert row in md, row
    assert "| HRA: step <= 1.5x our LoRA |" in md and "| AntiPaSTO: attach <= PEFT PiSSA init |" in md


def test_compiled_rows_are_compared_with_compiled_rows():
    speed = load_speed()
    base = speed.make_model("tiny", torch.device("cpu"), torch.float32)
    rows = speed.build_rows(["lora", "antipasto"], 4, 8, torch.float32, [], base)
    rows += speed.compiled_rows(rows, "eager")
    compiled = [r for r in rows if r.compiled]
    assert [r.key for r in compiled] == ["limit+compiled", "peft:lora+compiled", "ll:lora+compiled"]
    for i, row in enumerate(rows):  # made-up step times: compiled rows twice as fast
        row.step_s = [0.0] if not row.step else [(1.0 + i / 10) / (2 if row.compiled else 1)] * 3
    by = {d["key"]: d for d in speed.summarise([r for r in rows if r.step])}
    t = {r.key: r.step_s[0] for r in rows}
    assert by["ll:lora+compiled"]["vs_peft"]["median"] == t["ll:lora+compiled"] / t["peft:lora+compiled"]
    assert by["ll:lora+compiled"]["vs_limit"]["median"] == t["ll:lora+compiled"] / t["limit+compiled"]
    assert by["ll:lora"]["vs_limit"]["median"] == t["ll:lora"] / t["limit"]
