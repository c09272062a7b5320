"""The README's "Training with ..." snippets, run verbatim on their tiny random models."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_lite as ll

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def snippets() -> dict[str, str]:
    """The section's python blocks by what they show: trainer, torchrun, accelerate, compile."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Training with ", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 4, "README's Training with section needs its 4 python snippets"
    return dict(zip(["trainer", "torchrun", "accelerate", "compile"], blocks))


def run(code: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})


def assert_adapter(path: Path, spec: str) -> None:
    meta = ll.read_metadata(path)
    assert meta["spec_name"] == spec and meta["targets"]


def test_trainer_snippet(tmp_path, monkeypatch):
    run(snippets()["trainer"], tmp_path, monkeypatch)
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert_adapter(ckpt / "model.safetensors", "lora")
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "trainer_state.json").is_file()


def test_accelerate_snippet(tmp_path, monkeypatch):
    run(snippets()["accelerate"], tmp_path, monkeypatch)
    assert_adapter(tmp_path / "adapter.safetensors", "dora")


def test_compile_snippet(tmp_path, monkeypatch):
    # aot_eager traces forward and backward as inductor does, without its minutes of C++ builds
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    run(snippets()["compile"], tmp_path, monkeypatch)
    assert_adapter(tmp_path / "adapter.safetensors", "lora")


def test_torchrun_snippet_with_ddp_and_fsdp2(tmp_path):
    (tmp_path / "train.py").write_text(snippets()["torchrun"])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    runs = {}
    for flag in ("ddp", "fsdp"):  # both at once; --standalone picks a free port
        cwd = tmp_path / flag
        cwd.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "../train.py"]
        runs[flag] = subprocess.Popen(
            cmd + (["--fsdp"] if flag == "fsdp" else []),
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    for flag, p in runs.items():
        out = p.communicate(timeout=300)[0].decode()
        assert p.returncode == 0, out[-3000:]
        assert_adapter(tmp_path / flag / "adapter.safetensors", "pissa")
