"""The bench end to end, tiny: random byte-level model, built-in problems, two variants, two steps."""

from __future__ import annotations

import json
import math

from lora_lite.bench import builtin_problems, main, markdown_table, normalise_number

KEYS = [
    "eval_nll_before",
    "eval_nll_after",
    "accuracy",
    "trainable_params",
    "step_ms",
    "peak_mem_gb",
    "attach_s",
    "reload_max_abs_diff",
]


def test_bench_tiny_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub: the built-in problems must be used
    out = tmp_path / "out"
    args = [
        "--model",
        "tiny",
        "--variants",
        "lora,ia3_ff",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "160",
        "--eval-samples",
        "4",
        "--gen-samples",
        "2",
        "--max-new-tokens",
        "4",
        "--out",
        str(out),
        "--lr",
        "1e-2",
    ]
    assert main(args) == 0
    records = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in records] == ["lora", "ia3_ff"]
    for r in records:
        for k in KEYS:
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (r["variant"], k, r[k])
        assert r["data"] == "built-in arithmetic problems"
        assert r["eval_nll_before"] > 0 and r["trainable_params"] > 0 and len(r["losses"]) == 2
        assert r["reload_max_abs_diff"] < 1e-5 and r["detach_weight_max_abs_diff"] == 0.0
    md = (out / "results.md").read_text()
    assert "| LoRA |" in md and "| IA3-FF |" in md and "built-in arithmetic problems" in md
    assert (out / "loss.png").stat().st_size > 1000
    assert main(["--report", str(out / "results.json")]) == 0
    assert "| LoRA |" in capsys.readouterr().out


def test_builtin_problems_are_gsm8k_formatted_and_deterministic():
    a, b = builtin_problems(50, seed=3), builtin_problems(50, seed=3)
    assert a == b
    for ex in a:
        assert ex.answer.rstrip().split("#### ")[-1] == ex.gold
    assert normalise_number("The answer is 1,234.50 dollars") == "1234.5"
    assert markdown_table([]).count("\n") == 2


def test_bench_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert main(["--model", "tiny", "--variants", "nonexistent", "--out", str(tmp_path)]) == 2
    assert "lora-lite bench: error: unknown spec 'nonexistent'" in capsys.readouterr().err
    assert main(["--model", "tiny", "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "missing train.jsonl" in capsys.readouterr().err


def test_bench_keeps_going_after_a_failing_variant(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "o"
    args = [
        "--model",
        "tiny",
        "--variants",
        "eva,lora",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "160",
        "--eval-samples",
        "2",
        "--gen-samples",
        "1",
        "--max-new-tokens",
        "2",
        "--calib-batches",
        "0",
        "--out",
        str(out),
    ]
    assert main(args) == 1  # eva needs calibration data: it fails, lora still runs
    assert [r["variant"] for r in json.loads((out / "results.json").read_text())] == ["lora"]
    assert json.loads((out / "errors.json").read_text())[0]["variant"] == "eva"
