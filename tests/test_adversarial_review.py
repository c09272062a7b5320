"""Found by an adversarial review that saw only the README and the public API: a spec whose
target regex backtracks exponentially must be refused before attach runs it on module names,
and a save must never remove a user's own `.tmp` file that merely sits next to the checkpoint."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import lora_lite as ll
from conftest import attach_small, make_model

SPECS = Path(__file__).resolve().parents[1] / "specs"

# Each would take minutes to hours of re.search on a 30-character module name that has no `!`.
CATASTROPHIC = ["([a-z_.0-9]+)+!", "(a|a)*!", "(.*)*!", ".*.*.*.*.*!"]


@pytest.mark.parametrize("rx", CATASTROPHIC)
def test_spec_with_a_backtracking_target_regex_is_refused_before_attach(tmp_path, rx):
    text = (SPECS / "lora.yaml").read_text().replace("name: lora", "name: redos")
    text = text.replace("names: ['\\.q_proj$', '\\.v_proj$']", f"names: ['{rx}']")
    path = tmp_path / "redos.yaml"
    path.write_text(text)
    with pytest.raises(ll.SpecError) as e:
        ll.from_spec(str(path))
    assert "\n" not in str(e.value) and "$.target.names[0]" in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("rx", CATASTROPHIC)
def test_backtracking_target_names_override_is_refused(rx):
    with pytest.raises(ll.SpecError, match=r"lora\.target_names: regex"):
        ll.from_spec("lora", target_names=[rx])


ORDINARY = [r"\.q_proj$", r"layers\.\d+\.self_attn\.(q|v)_proj$", r".*\.mlp\..*_proj$", "[qv]_proj"]


@pytest.mark.parametrize("rx", ORDINARY)
def test_ordinary_target_regexes_still_work(rx):
    model = make_model()
    ll.attach(model, ll.from_spec("lora", target_names=[rx]))
    assert ll.trainable_parameters(model)


def test_save_keeps_a_users_own_tmp_files_next_to_the_checkpoint(tmp_path):
    model = make_model()
    attach_small(model, "lora")
    path = tmp_path / "a.safetensors"
    ll.save(model, path)
    copy = path.read_bytes()
    mine = {
        "a.safetensors.backup01.tmp": copy,  # a user's copy of the checkpoint, 8 characters as mkstemp
        "a.safetensors.abcdef12.tmp": b"notes",
        "a.safetensors.0123456789abcdef.tmp": b"precious data",  # the name a save uses, other content
    }
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    ll.save(model, path)
    assert {n: (tmp_path / n).read_bytes() for n in mine} == mine


def test_a_nul_byte_in_a_path_is_a_one_line_refusal_naming_it(tmp_path):
    model = make_model()
    with pytest.raises(ll.CheckpointError, match="cannot read: embedded null byte"):
        ll.load(model, str(tmp_path / "a\0b.safetensors"))
    with pytest.raises(ll.SpecError, match="cannot read: embedded null byte"):
        ll.from_spec(str(tmp_path / "my\0spec.yaml"))
    attach_small(model, "lora")
    with pytest.raises(ll.CheckpointError, match="cannot write: the path holds a NUL byte"):
        ll.save(model, str(tmp_path / "a\0b.safetensors"))


def test_save_to_a_name_near_the_length_limit(tmp_path):
    # <name>.<16 hex>.tmp would pass the 255-byte limit: the temporary name is cut, the file is not
    model = make_model()
    attach_small(model, "lora")
    path = tmp_path / ("n" * 240 + ".safetensors")
    ll.save(model, path)
    ll.save(model, path)  # over the old one, cleaning up after itself
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert ll.read_metadata(path)["spec_name"] == "lora"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="only root may give a file to another user")
def test_save_over_another_users_checkpoint_keeps_its_owner_and_mode(tmp_path):
    model = make_model()
    attach_small(model, "lora")
    path = tmp_path / "a.safetensors"
    ll.save(model, path)
    os.chown(path, 1234, 2345)
    os.chmod(path, 0o600)
    ll.save(model, path)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 2345, 0o600)
