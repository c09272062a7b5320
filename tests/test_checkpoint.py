"""Checkpoint format and save guarantees: format-1 files (lora-lite 0.1.0) still load with the
logits they were saved with; format 2 carries a digest; a save never loses or half-writes a
checkpoint (non-finite tensors refused, failed writes cleaned up, stale temporary files removed
but live ones kept, permissions kept, symlinks followed, I/O errors named). Bad checkpoints:
tests/bad_checkpoints/."""

from __future__ import annotations

import errno
import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_bytes

import lora_lite as ll
from conftest import assert_unchanged, attach_small, logits, make_model, perturb, snapshot
from lora_lite import checkpoint

try:
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

V1 = Path(__file__).parent / "fixtures" / "checkpoint_v1"


@pytest.mark.parametrize("name", ["lora", "pissa"])
def test_format_1_checkpoint_loads_with_the_logits_it_was_saved_with(name):
    path = V1 / f"{name}.safetensors"
    assert ll.read_metadata(path)["format_version"] == 1
    model = make_model()
    ll.load(model, path)
    with safe_open(str(path), framework="pt") as f:  # the adapter tensors arrive bit for bit
        for key in f.keys():
            target, tensor = key.rsplit(".", 1)
            assert torch.equal(getattr(model.get_submodule(target), tensor), f.get_tensor(key)), key
    want = load_file(V1 / "expected_logits.safetensors")[name]
    assert torch.equal(logits(model), want)


def test_format_1_checkpoint_of_a_shipped_spec_needs_no_spec_compile(monkeypatch):
    # a stricter spec schema may refuse 0.1.0's spec text; the shipped module of that name is used
    def refuse(text, name):
        raise ll.SpecError([f"<checkpoint spec {name}>: refused"])

    monkeypatch.setattr(checkpoint, "variant_from_text", refuse)
    model = make_model()
    ll.load(model, V1 / "pissa.safetensors")
    assert torch.equal(logits(model), load_file(V1 / "expected_logits.safetensors")["pissa"])


def test_format_1_checkpoint_with_an_edited_spec_is_compiled_and_its_errors_name_the_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_LITE_CACHE", str(tmp_path / "cache"))
    meta = ll.read_metadata(V1 / "lora.safetensors")
    meta["spec"] = meta["spec"].replace("name: lora", "name: lora\nbogus: 1")
    bad = tmp_path / "v1.safetensors"
    bad.write_bytes(st_bytes(load_file(V1 / "lora.safetensors"), metadata={"lora_lite": json.dumps(meta)}))
    model = make_model()
    snap = snapshot(model)
    with pytest.raises(ll.CheckpointError, match=r"v1.safetensors: \$.spec: <checkpoint spec lora>:\d+: \$\."):
        ll.load(model, bad)  # no digest in format 1: the edit is judged by the spec compiler
    assert_unchanged(model, snap)


def test_save_writes_format_2_with_a_digest_of_metadata_and_tensors(tmp_path):
    model = make_model()
    attach_small(model, "lora")
    perturb(model)
    path = ll.save(model, tmp_path / "a.safetensors")
    meta = ll.read_metadata(path)
    assert meta["format_version"] == checkpoint.FORMAT_VERSION == 2
    assert meta["sha256"] == checkpoint.digest(meta, load_file(path))
    fresh = make_model()
    ll.load(fresh, path)
    assert torch.equal(logits(fresh), logits(model))


def test_loading_never_unpickles(tmp_path, monkeypatch):
    calls = []
    for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: calls.append(_n))
    model = make_model()
    ll.load(model, V1 / "lora.safetensors")
    ll.save(model, tmp_path / "v2.safetensors")
    ll.detach(model)
    ll.load(model, tmp_path / "v2.safetensors")
    ll.detach(model)
    for name in ("a.pt", "a.bin", "a.safetensors"):
        (tmp_path / name).write_bytes(pickle.dumps({"x": 1}, protocol=4))
        with pytest.raises(ll.CheckpointError, match="pickle"):
            ll.load(model, tmp_path / name)
    assert calls == []
    root = Path(ll.__file__).parents[1]  # no torch.load call anywhere in the package
    sources = [p for d in ("lora_lite", "codegen", "generated") for p in (root / d).glob("*.py")]
    assert sources and not [p for p in sources if "torch.load(" in p.read_text()]


# ---------------------------------------------------------------- save guarantees


def saved(tmp_path, name="a.safetensors"):
    """A model with a perturbed LoRA adapter, saved to tmp_path / name."""
    model = make_model()
    ll.attach(model, ll.LoRAConfig(r=2))
    perturb(model)
    return model, ll.save(model, tmp_path / name)


def test_save_refuses_non_finite_tensors_and_leaves_the_destination_untouched(tmp_path):
    model, path = saved(tmp_path)
    before = path.read_bytes()
    params = dict(model.named_parameters())
    with torch.no_grad():
        params["model.layers.0.self_attn.q_proj.lora_B"][0, 0] = float("nan")
        params["model.layers.1.self_attn.v_proj.lora_A"][1, 1] = float("inf")
    with pytest.raises(ll.CheckpointError) as info:
        ll.save(model, path)
    msg = str(info.value)
    assert len(msg.splitlines()) == 1
    assert "tensor 'model.layers.0.self_attn.q_proj.lora_B': holds NaN/inf values (and 1 more:" in msg
    assert "model.layers.1.self_attn.v_proj.lora_A" in msg and "untouched" in msg
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_a_failing_write_removes_its_temporary_file_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model, path = saved(tmp_path)
    before = path.read_bytes()
    perturb(model, seed=2)

    def disk_full(fd, data):
        os.write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_all", disk_full)
    with pytest.raises(ll.CheckpointError, match=f"^{path}: cannot write: No space left on device; the destination"):
        ll.save(model, path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["a.safetensors"]
    monkeypatch.setattr(checkpoint, "_write_all", lambda fd, data: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # an interrupted save cleans up too
        ll.save(model, path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_a_file_that_would_not_load_back_is_never_put_in_place(tmp_path, monkeypatch):
    model, path = saved(tmp_path)
    before = path.read_bytes()
    perturb(model, seed=2)
    real = checkpoint._write_all
    monkeypatch.setattr(checkpoint, "_write_all", lambda fd, data: real(fd, bytes(data)[:-1] + b"\x7f"))
    with pytest.raises(ll.CheckpointError, match="did not read back .*digest mismatch"):
        ll.save(model, path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["a.safetensors"]


@pytest.mark.skipif(fcntl is None, reason="flock is POSIX")
def test_stale_temporary_files_are_removed_and_a_live_locked_one_is_kept(tmp_path):
    model, path = saved(tmp_path)
    stale = [
        tmp_path / "a.safetensors.0123456789abcdef.tmp",
        tmp_path / "a.safetensors.k3j_x9QZ.tmp",
    ]  # ours, mkstemp's
    live = tmp_path / "a.safetensors.fedcba9876543210.tmp"
    others = [tmp_path / "a.safetensors.keep.tmp", tmp_path / "b.safetensors.0123456789abcdef.tmp"]
    for p in [*stale, live, *others]:
        p.write_bytes(b"partial")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a concurrent save still writing it
        ll.save(model, path)
        assert live.read_bytes() == b"partial"
    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)
    ll.save(model, path)  # no longer locked: a killed save's leftover now
    assert not live.exists()


@pytest.mark.skipif(fcntl is None, reason="flock is POSIX")
def test_a_save_racing_a_cleaner_never_loses_its_temporary_file(tmp_path, monkeypatch):
    # the cleaner locks and removes a fresh temp before its save locks it: the save starts over
    model, path = saved(tmp_path)
    real_open, calls = os.open, []

    def open_then_clean(p, flags, mode=0o777, **kw):
        fd = real_open(p, flags, mode, **kw)
        if str(p).endswith(".tmp") and flags & os.O_CREAT:
            calls.append(p)
            if len(calls) == 1:
                checkpoint._remove_stale_temps(path)  # runs in the window before the save's flock
        return fd

    monkeypatch.setattr(checkpoint.os, "open", open_then_clean)
    ll.save(model, path)
    monkeypatch.undo()
    assert len(calls) == 2  # the first temporary file was taken away, the save wrote a second one
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]
    ll.load(make_model(), path)


def test_save_keeps_the_destination_mode_and_new_files_get_the_umask_mode(tmp_path):
    model, path = saved(tmp_path)
    for mode in (0o640, 0o444, 0o200):  # a read-only file is replaced (the folder is writable), mode kept
        os.chmod(path, mode)
        ll.save(model, path)
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
    old = os.umask(0o027)
    try:
        new = ll.save(model, tmp_path / "new.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o640  # 0o666 & ~0o027, not mkstemp's 0o600


def test_save_through_a_symlink_replaces_the_real_file_and_keeps_the_link(tmp_path):
    model, _ = saved(tmp_path, "real.safetensors")
    (tmp_path / "link.safetensors").symlink_to("real.safetensors")
    perturb(model, seed=3)
    ll.save(model, tmp_path / "link.safetensors")
    assert (tmp_path / "link.safetensors").is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["link.safetensors", "real.safetensors"]
    fresh = make_model()
    ll.load(fresh, tmp_path / "real.safetensors")
    assert torch.equal(logits(fresh), logits(model))


def test_io_errors_name_the_path(tmp_path, monkeypatch):
    model, _ = saved(tmp_path)
    with pytest.raises(ll.CheckpointError, match=r"a.pt: ll.load refuses .pt files \(pickle\)"):
        ll.save(model, tmp_path / "a.pt")  # a name load would refuse is never written
    assert not (tmp_path / "a.pt").exists()
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    with pytest.raises(ll.CheckpointError, match=f"^{folder}: cannot write: Is a directory$"):
        ll.save(model, folder)
    real_open = os.open

    def read_only(p, flags, *a, **kw):
        if str(p).endswith(".tmp"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(p, flags, *a, **kw)

    monkeypatch.setattr(checkpoint.os, "open", read_only)
    dest = tmp_path / "ro" / "a.safetensors"
    with pytest.raises(ll.CheckpointError, match=f"^{dest}: cannot write: Read-only file system$"):
        ll.save(model, dest)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "ro")) == []
