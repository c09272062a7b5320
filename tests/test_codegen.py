"""Golden source text: generated/ is exactly what the compiler renders from specs/.

A mismatch prints a unified diff and the command that updates the goldens (`just gen`).
"""

from __future__ import annotations

import ast
import difflib
import shutil
from pathlib import Path

import pytest

from lora_lite.cli import main
from lora_lite.codegen import check, generate, load_spec, render

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_generated_module_matches_golden(path):
    spec = load_spec(path, display=f"specs/{path.name}")
    text = render(spec)
    golden = ROOT / "generated" / f"{spec.name}.py"
    assert golden.exists(), f"missing golden {golden}; run: just gen"
    old = golden.read_text()
    if old != text:
        diff = "".join(difflib.unified_diff(old.splitlines(True), text.splitlines(True), str(golden), "rendered"))
        pytest.fail(f"{golden} is stale; run: just gen\n{diff}")


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_render_is_deterministic_and_parses(path):
    spec = load_spec(path, display=f"specs/{path.name}")
    a, b = render(spec), render(load_spec(path, display=f"specs/{path.name}"))
    assert a == b
    tree = ast.parse(a)
    assert a.startswith(f"# Code generated from specs/{path.name} by lora_lite.codegen. DO NOT EDIT.\n")
    doc = ast.get_docstring(tree)
    assert spec.title in doc and "Identity at init" in doc
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert {"Config", "init", "forward", "shapes", "frozen_weight"} <= names  # the whole Variant contract


def test_generate_into_tmp_matches_checkout_byte_for_byte(tmp_path):
    out = tmp_path / "generated"
    written = generate(ROOT / "specs", out)
    assert written, "generate wrote nothing into an empty folder"
    for p in sorted(out.glob("*.py")):
        assert p.read_bytes() == (ROOT / "generated" / p.name).read_bytes(), p.name
    assert sorted(p.name for p in out.glob("*.py")) == sorted(p.name for p in (ROOT / "generated").glob("*.py"))
    assert generate(ROOT / "specs", out) == []  # second run: nothing changes


def test_check_lists_stale_missing_and_orphaned(tmp_path, capsys):
    out = tmp_path / "gen"
    shutil.copytree(ROOT / "generated", out)
    assert check(ROOT / "specs", out) == []
    (out / "lora.py").write_text((out / "lora.py").read_text() + "# edited by hand\n")
    (out / "pissa.py").unlink()
    (out / "old_variant.py").write_text(
        "# Code generated from specs/old_variant.yaml by lora_lite.codegen. DO NOT EDIT.\n"
    )
    (out / "helpers.py").write_text("x = 1  # a user's own file: never listed or removed\n")
    problems = check(ROOT / "specs", out)
    assert problems == [
        f"stale: {out / 'lora.py'}",
        f"missing: {out / 'pissa.py'}",
        f"orphaned: {out / 'old_variant.py'}",
    ]
    assert main(["gen", "--check", "--specs", str(ROOT / "specs"), "--out", str(out)]) == 1
    assert "run: just gen" in capsys.readouterr().err
    assert (out / "old_variant.py").exists()  # --check writes nothing
    assert main(["gen", "--specs", str(ROOT / "specs"), "--out", str(out)]) == 0
    assert check(ROOT / "specs", out) == []
    assert not (out / "old_variant.py").exists()
    assert (out / "helpers.py").read_text().startswith("x = 1")


def test_gen_refuses_to_overwrite_a_hand_written_file(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora.py").write_text("my own code\n")
    assert main(["gen", "--specs", str(ROOT / "specs"), "--out", str(out)]) == 1
    assert "refusing to overwrite hand-written file(s)" in capsys.readouterr().err
    assert (out / "lora.py").read_text() == "my own code\n" and not (out / "pissa.py").exists()


def test_example_runs_and_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    assert main(["example", "--variant", "lokr", "--steps", "2", "--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "lokr.safetensors").is_file()
    capsys.readouterr()
    (tmp_path / "file").write_text("")
    cases = [
        (["--variant", "nope", "--steps", "0"], "unknown spec 'nope'"),
        (["--steps", "-1"], "--steps: must be at least 0, got -1"),
        (["--steps", "0", "--out", str(tmp_path / "file" / "o")], f"{tmp_path / 'file' / 'o'}"),
    ]
    for args, says in cases:
        assert main(["example", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lora-lite example: error: {says}") and err.count("\n") == 1, err


def test_gen_refuses_bad_spec_and_writes_nothing(tmp_path, capsys):
    specs = tmp_path / "specs"
    specs.mkdir()
    shutil.copy(ROOT / "specs" / "lora.yaml", specs)
    shutil.copy(ROOT / "tests" / "bad_specs" / "bad_enum.yaml", specs)
    out = tmp_path / "out"
    assert main(["gen", "--specs", str(specs), "--out", str(out)]) == 1
    assert "$.core.kind: 'magnitde' is not one of" in capsys.readouterr().err
    assert not out.exists()


def test_user_folder_headers_name_its_spec_file_and_gen_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my specs").mkdir()
    shutil.copy(ROOT / "specs" / "lora.yaml", tmp_path / "my specs" / "lora.yaml")
    assert main(["gen", "--specs", "my specs", "--out", "out"]) == 0
    regen = "lora-lite gen --specs 'my specs' --out out"
    check_cmd = "lora-lite gen --check --specs 'my specs' --out out"
    head = (tmp_path / "out" / "lora.py").read_text().splitlines()[:2]
    assert head == [
        "# Code generated from my specs/lora.yaml by lora_lite.codegen. DO NOT EDIT.",
        f"# Regenerate: {regen}    Check: {check_cmd}",
    ]
    assert (tmp_path / "out" / "__init__.py").read_text().splitlines()[1] == head[1]
    assert main(["gen", "--check", "--specs", "my specs", "--out", "out"]) == 0  # the same headers again
    shipped = (ROOT / "generated" / "lora.py").read_text()
    assert shipped.splitlines()[:2] == [
        "# Code generated from specs/lora.yaml by lora_lite.codegen. DO NOT EDIT.",
        "# Regenerate: just gen    Check: just gen-check",
    ]
    want = shipped.replace("from specs/lora.yaml", "from my specs/lora.yaml")  # header and Config docstring
    want = want.replace("# Regenerate: just gen    Check: just gen-check", head[1])
    assert (tmp_path / "out" / "lora.py").read_text() == want  # nothing else differs


def test_user_spec_cache_copy_header_names_the_file_and_from_spec(tmp_path, monkeypatch):
    import lora_lite as ll

    monkeypatch.setenv("LORA_LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "specs" / "lora.yaml").read_text().replace("name: lora\n", "name: my_lora\n")
    (tmp_path / "my_lora.yaml").write_text(text.replace("title: LoRA", "title: My LoRA"))
    module = type(ll.from_spec("my_lora.yaml")).variant()
    assert Path(module.__file__).read_text().splitlines()[:2] == [
        "# Code generated from my_lora.yaml by lora_lite.codegen. DO NOT EDIT.",
        "# Regenerate: ll.from_spec('my_lora.yaml')    Check: lora-lite validate my_lora.yaml",
    ]


def test_cli_output_into_a_closed_pipe_exits_quietly():
    import subprocess
    import sys

    for args in (["matrix"], ["matrix", "--json"], ["gen", "--check"]):
        cmd = [sys.executable, "-c", "import sys; from lora_lite.cli import main; sys.exit(main())", *args]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # `| head -0`: the reader is gone before the first line is written
        err = proc.stderr.read().decode()
        assert proc.wait() == 1 and "Traceback" not in err and "BrokenPipe" not in err, (args, err)


def test_user_folder_check_is_clean_however_the_folders_are_spelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    shutil.copy(ROOT / "specs" / "lora.yaml", tmp_path / "mine" / "lora.yaml")
    assert main(["gen", "--specs", "mine", "--out", "out"]) == 0
    first = (tmp_path / "out" / "lora.py").read_text()
    for specs, out in [("./mine/", "./out"), (str(tmp_path / "mine"), str(tmp_path / "out")), ("out/../mine", "out")]:
        assert main(["gen", "--check", "--specs", specs, "--out", out]) == 0, (specs, out)
        assert main(["gen", "--specs", specs, "--out", out]) == 0
        assert (tmp_path / "out" / "lora.py").read_text() == first  # the same bytes, not rewritten
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # a relative folder outside the current one stays relative
    assert main(["gen", "--specs", "../mine/", "--out", "../out2"]) == 0
    assert "--specs ../mine --out ../out2" in (tmp_path / "out2" / "lora.py").read_text().splitlines()[1]


def test_statistics_are_read_off_the_init_code_whatever_the_quotes():
    """STATISTICS lists the (i, i) calibration statistics init() reads, so calibration gathers
    them; a part written with either quote style must not be missed (init would raise KeyError)."""
    import lora_lite as ll
    from lora_lite.calibration import STATISTICS
    from lora_lite.codegen.compiler import _statistics

    code = """C = stats["second_moment"]\nD = stats['sequence_second_moment']\nn = stats['tokens'] + stats["mean"]"""
    assert _statistics(code) == ("second_moment", "sequence_second_moment")
    for name in ll.shipped_names():
        assert set(ll.from_spec(name).variant().STATISTICS) <= set(STATISTICS), name
