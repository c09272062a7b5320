"""`lora-lite bench` on the tiny random byte-level model: data, batch order, PEFT twins, outputs."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_lite as ll
from lora_lite.bench import builtin_problems, load_data, main, markdown_table, normalise_number
from lora_lite.bench.cli import config_from, parser, prepare
from lora_lite.bench.data import TRAIN_POOL, TrainOrder, calibration_rows
from lora_lite.bench.evaluate import answer_nll_sum
from lora_lite.bench.run import check_base, run_one
from lora_lite.bench.twins import TWINS

ROOT = Path(__file__).resolve().parents[1]
KEYS = [
    "eval_nll_before",
    "eval_nll_after",
    "accuracy",
    "trainable_params",
    "step_ms",
    "peak_mem_gb",
    "calibration_s",
    "build_s",
    "reload_max_abs_diff",
    "wall_s",
]
SMALL = ["--model", "tiny", "--batch-size", "2", "--seq-len", "96", "--eval-samples", "4", "--gen-samples", "1"]
SMALL += ["--max-new-tokens", "2"]


def run_bench(out: Path, *args: str) -> list[dict]:
    assert main([*SMALL, "--out", str(out), *args]) == 0
    return json.loads((out / "results.json").read_text())


def test_bench_offline_default_is_packaged_gsm8k_and_imports_no_peft(tmp_path):
    """A fresh offline run: GSM8K answer NLL from the packaged subset, named in the header;
    without --peft nothing of PEFT is imported."""
    out = tmp_path / "out"
    code = (
        "import sys; from lora_lite.bench import main; "
        f"rc = main({[*SMALL, '--variants', 'lora,ia3_ff', '--steps', '2', '--out', str(out)]!r}); "
        "print('PEFT_IMPORTED' if any(m == 'peft' or m.startswith('peft.') for m in sys.modules) else 'NO_PEFT'); "
        "sys.exit(rc)"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "NO_PEFT" in p.stdout
    records = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["library"]) for r in records] == [("lora", "lora-lite"), ("ia3_ff", "lora-lite")]
    for r in records:
        for k in KEYS:
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (r["variant"], k, r[k])
        assert r["data"].startswith("GSM8K, packaged subset")
        assert r["reload_max_abs_diff"] < 1e-5 and r["detach_weight_max_abs_diff"] == 0.0
        assert len(r["losses"]) == 2 and r["base_bit_identical_before"]
    md = (out / "results.md").read_text()
    assert md.startswith("Model: tiny random byte-level LM") and "Data: GSM8K, packaged subset" in md
    assert "| LoRA |" in md and "| IA3-FF |" in md and "PEFT after" not in md
    assert (out / "loss.png").stat().st_size > 1000


def test_peft_twins_share_batches_and_the_base_comes_back(tmp_path, monkeypatch, capsys):
    """--peft: each variant and its PEFT twin train on the same batches (equal step-1 loss for
    identity-at-init variants, calibrating or not), PEFT's PiSSA crop is undone before the next
    run (bit-identical base check), and results.md puts each pair on one row."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    records = run_bench(tmp_path, "--data", "builtin", "--variants", "pissa,lora,eva,ia3", "--steps", "1", "--peft")
    got = [(r["variant"], r["library"]) for r in records]
    assert got == [(v, lib) for v in ("pissa", "lora", "eva", "ia3") for lib in ("lora-lite", "peft")]
    first = records[0]["losses"][0]
    for r in records:
        assert r["losses"][0] == pytest.approx(first, rel=1e-5), (r["variant"], r["library"])
        assert r["base_bit_identical_before"] and r["data"] == "built-in arithmetic problems"
    peft_pissa = records[1]
    assert peft_pissa["detach_weight_max_abs_diff"] > 1e-3  # PEFT left W_res in the base; the bench undid it
    assert records[4]["calibration_s"] > 0 and records[5]["calibration_s"] > 0  # EVA calibrates in both
    md = (tmp_path / "results.md").read_text()
    assert "PEFT after" in md and "lora-lite - PEFT" in md and "PEFT " in md.splitlines()[0]
    assert sum(line.startswith("| PiSSA |") for line in md.splitlines()) == 1
    assert main(["--report", str(tmp_path / "results.json")]) == 0
    assert "| LoRA |" in capsys.readouterr().out


COMBINED = ("pissa", "lora", "eva", "ia3")  # the pairs of the test above
CROPPING = ("olora", "pissa_dora", "corda_lora", "corda_dora")  # PEFT writes W_res into the base


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """One prepared bench on the tiny model (built-in problems, one step) and its step-1 base loss."""
    out = tmp_path_factory.mktemp("twins")
    args = [*SMALL, "--data", "builtin", "--variants", "lora", "--steps", "1", "--peft", "--out", str(out)]
    b = prepare(config_from(parser().parse_args(args)))
    rows = [b.data.train[i] for i in TrainOrder(len(b.data.train), b.env.cfg.seed).batch(0, b.env.cfg.batch_size)]
    with torch.no_grad():
        s, n = answer_nll_sum(b.model, b.env.batch(rows))
    return b, float(s / n), out


@pytest.mark.parametrize("name", [n for n in TWINS if n not in COMBINED])
def test_each_twin_trains_beside_ours_from_the_base_loss_and_gives_the_base_back(name, tiny_bench):
    """Every PEFT twin builds from the spec's config and trains on the same batch: both start from
    the base model's step-1 loss (every twin is the identity at init); afterwards the base is
    bit-identical again (PEFT's cropping inits undone)."""
    b, base_loss, out = tiny_bench
    spec = name
    if name == "road":  # the tiny model's v_proj has 32 outputs: a group size that divides them
        spec = out / "road.yaml"
        text = (ROOT / "specs" / "road.yaml").read_text()
        spec.write_text(text.replace("group_size: {type: int, default: 64,", "group_size: {type: int, default: 16,"))
        spec = str(spec)
    if name == "lokr":  # r < max(k, n) / 2 on the tiny model's 8 x 8 factors, where PEFT keeps w2 low-rank too
        spec = out / "lokr.yaml"
        text = (ROOT / "specs" / "lokr.yaml").read_text()
        spec.write_text(text.replace("r: {type: int, default: 8,", "r: {type: int, default: 2,"))
        spec = str(spec)
    ours, theirs = run_one(b, spec, "lora-lite"), run_one(b, spec, "peft")
    check_base(b)
    assert ours["trainable_params"] == theirs["trainable_params"] > 0
    for r in (ours, theirs):
        assert r["losses"][0] == pytest.approx(base_loss, rel=1e-5), (name, r["library"])
        assert r["reload_max_abs_diff"] < 1e-4, (name, r["library"])
    if ll.variant_module(spec).CALIBRATION == "required":
        assert ours["calibration_s"] > 0 and theirs["calibration_s"] > 0
    if name in CROPPING:  # PEFT left W_res in the base after unload(); the bench undid it
        assert theirs["detach_weight_max_abs_diff"] > 1e-4


def test_packaged_and_full_copies_give_the_same_batches():
    """The training order only reads the first TRAIN_POOL rows, each pass a fresh permutation;
    calibration rows come from another stream."""
    packaged, full = TrainOrder(TRAIN_POOL, seed=0), TrainOrder(7473, seed=0)
    batches = [packaged.batch(s, 8) for s in range(310)]  # 300 x 8 is one pass; 310 starts a second
    assert batches == [full.batch(s, 8) for s in range(310)]
    assert sorted(i for b in batches[:300] for i in b) == list(range(TRAIN_POOL))
    assert batches[:5] != [TrainOrder(TRAIN_POOL, seed=1).batch(s, 8) for s in range(5)]
    assert calibration_rows(7473, 32, 0) == calibration_rows(TRAIN_POOL, 32, 0) != batches[0] + batches[1]
    data = load_data("gsm8k", None, seed=0) if os.environ.get("HF_HUB_OFFLINE") else None
    if data is not None:  # offline: the packaged subset, first rows of GSM8K
        assert len(data.train) >= TRAIN_POOL and len(data.test) >= 200 and data.test[0].gold == "18"


def test_bench_functions_are_small():
    """No function of the bench package over 40 lines or with more than 5 parameters."""
    bad = []
    for path in sorted((ROOT / "lora_lite" / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs) if p.arg not in ("self", "cls")]
                params += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
                lines = node.end_lineno - node.lineno + 1
                if lines > 40 or len(params) > 5:
                    bad.append(f"{path.name}:{node.lineno} {node.name}: {lines} lines, {len(params)} parameters")
    assert not bad, bad


def test_every_twin_is_a_shipped_spec():
    assert set(TWINS) <= set(ll.shipped_names())


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


@pytest.mark.parametrize("variants", ["lora,lora", "lora,specs/lora.yaml"])
def test_bench_refuses_a_variant_given_twice_in_one_line(tmp_path, capsys, monkeypatch, variants):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    out = tmp_path / "o"
    assert main(["--model", "tiny", "--data", "builtin", "--variants", variants, "--out", str(out)]) == 2
    second = variants.split(",")[1]
    assert capsys.readouterr().err == f"lora-lite bench: error: --variants: lora is given twice ('lora', {second!r})\n"
    assert not out.exists()


def test_explicit_variants_replace_the_quick_presets_list():
    assert config_from(parser().parse_args(["--quick"])).variants == ("lora", "ia3", "antipasto_corda")
    cfg = config_from(parser().parse_args(["--quick", "--peft", "--variants", "lora"]))
    assert cfg.variants == ("lora",) and cfg.steps == 20 and cfg.peft


def test_bench_keeps_going_after_a_failing_variant(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "o"
    args = [*SMALL, "--data", "builtin", "--variants", "eva,lora", "--steps", "1", "--calib-batches", "0"]
    assert main([*args, "--out", str(out)]) == 1  # eva needs calibration data: it fails, lora still runs
    assert [r["variant"] for r in json.loads((out / "results.json").read_text())] == ["lora"]
    assert json.loads((out / "errors.json").read_text())[0]["variant"] == "eva"


def test_gpu_bench_script_smoke(tmp_path):
    """benchmarks/gpu_bench.sh on the CPU with the tiny model: runs, pairs, prints wall times."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", WHEELS="none")
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_bench.sh"), "--model", "tiny", "--steps", "2", "--device", "cpu"]
    cmd += ["--variants", "lora", "--eval-samples", "2", "--gen-samples", "1", "--max-new-tokens", "2"]
    cmd += ["--seq-len", "64", "--out", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    table = p.stdout.split("wall time per run:")[-1].splitlines()[2:]
    assert [line.split()[:2] for line in table] == [["lora", "lora-lite"], ["lora", "peft"]]
    assert all(float(line.split()[2]) >= 0 for line in table)
    assert json.loads((tmp_path / "results.json").read_text())[0]["settings"]["steps"] == 2


@pytest.mark.parametrize("niter, init", [(0, "pissa"), (4, "pissa_niter_4")])
def test_pissa_twin_follows_the_specs_svd_niter(niter, init):
    pytest.importorskip("peft")
    pcfg = TWINS["pissa"].make(ll.from_spec("pissa", r=4, svd_niter=niter), ["q_proj"])
    assert pcfg.init_lora_weights == init and pcfg.r == 4


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("--steps", "0", "--steps: must be at least 1, got 0"),
        ("--steps", "-1", "--steps: must be at least 1, got -1"),
        ("--batch-size", "0", "--batch-size: must be at least 1, got 0"),
        ("--seq-len", "1", "--seq-len: must be at least 2, got 1"),
        ("--eval-samples", "-3", "--eval-samples: must be at least 1, got -3"),
        ("--gen-samples", "-1", "--gen-samples: must be at least 0, got -1"),
        ("--max-new-tokens", "0", "--max-new-tokens: must be at least 1, got 0"),
        ("--calib-batches", "-1", "--calib-batches: must be at least 0, got -1"),
        ("--lr", "-1", "--lr: must be a finite number >= 0, got -1"),
        ("--lr", "nan", "--lr: must be a finite number >= 0, got nan"),
        ("--lr-floor", "inf", "--lr-floor: must be a finite number >= 0, got inf"),
        ("--device", "foo", "--device: unknown device 'foo'; use auto, cpu, cuda, cuda:1 ..."),
    ],
)
def test_bench_refuses_out_of_range_settings_in_one_line_before_loading(tmp_path, capsys, flag, value, says):
    out = tmp_path / "o"
    assert main(["--model", "tiny", "--data", "builtin", "--variants", "lora", flag, value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"lora-lite bench: error: {says}\n"
    assert not out.exists()  # refused before anything was written


def test_bench_unreadable_model_report_or_out_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "no-such-model"), "--variants", "lora", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-lite bench: error: --model ") and err.count("\n") == 1
    assert main(["--report", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-lite bench: error: --report ") and "missing.json" in err and err.count("\n") == 1
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["--report", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-lite bench: error: --report ") and err.count("\n") == 1
    (tmp_path / "file").write_text("")
    args = ["--model", "tiny", "--data", "builtin", "--variants", "lora", "--out", str(tmp_path / "file" / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-lite bench: error: --out ") and err.count("\n") == 1


def test_converted_model_folder_gets_the_umask_modes_not_private_ones(tmp_path, monkeypatch):
    """The GGUF conversion writes in a mkdtemp folder (0700); the cached folder and its files end
    with the umask's modes, so a shared cache stays readable, whatever modes the writers chose."""
    import transformers

    from lora_lite.bench.models import gguf_cached
    from lora_lite.codegen.atomic import current_umask

    class Saved:  # stands for the converted model and tokenizer: writes one private file each
        config = type("Config", (), {})()
        hf_quantizer = "gguf"

        def __init__(self, name):
            self.name = name

        def save_pretrained(self, folder, **kw):
            fd = os.open(Path(folder) / self.name, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)

    monkeypatch.setenv("LORA_LITE_CACHE", str(tmp_path / "cache"))
    model, tok = Saved("model.safetensors"), Saved("tokenizer.json")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    folder = gguf_cached(gguf)
    mask = current_umask()
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask
    files = {f.name: f.stat().st_mode & 0o777 for f in folder.iterdir()}
    assert files == {"model.safetensors": 0o666 & ~mask, "tokenizer.json": 0o666 & ~mask}
