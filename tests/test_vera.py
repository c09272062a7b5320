"""VeRA (specs/vera.yaml): one frozen random pair A, B per adapter, shared by every target.

A and B exist once in memory (every target holds the same Parameter, through dtype moves and
in named adapters) and once in a checkpoint (`shared.<name>`), and load checks their shapes.
PEFT parity (logits, gradients, the seeded A and B) is in tests/test_peft_parity.py.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save as st_bytes

import lora_lite as ll
from conftest import assert_unchanged, logits, make_model, perturb, snapshot
from lora_lite import checkpoint

SHARED = ("lora_vera_A", "lora_vera_B")


def shared_ptrs(model, name: str = "default") -> dict[str, set[int]]:
    """data_ptr of each shared tensor as every target of adapter `name` holds it."""
    targets = ll.state(model, name).targets.values()
    return {k: {getattr(t.holder, k).data_ptr() for t in targets} for k in SHARED}


def test_shared_a_and_b_are_one_tensor_for_every_target_and_sized_by_the_largest():
    model = make_model()  # q 32 -> 32, v 32 -> 16
    ll.attach(model, ll.from_spec("vera"))  # r = 256, larger than every layer dimension: not clamped
    st = ll.state(model)
    assert len(st.targets) == 4 and all(len(p) == 1 for p in shared_ptrs(model).values())
    A = next(iter(st.targets.values())).module.lora_vera_A
    B = next(iter(st.targets.values())).module.lora_vera_B
    assert A.shape == (256, 32) and B.shape == (32, 256) and not A.requires_grad and not B.requires_grad
    for t in st.targets.values():
        assert t.cfg.r == 256 and t.module.lora_vera_lambda_d.shape == (256,)
        assert t.module.lora_vera_lambda_b.shape == (ll.runtime.layer_dims(t.module)[1],)
    # trainable: r + d_out per target; A and B are counted once among all parameters
    want = sum(256 + ll.runtime.layer_dims(t.module)[1] for t in st.targets.values())
    assert sum(p.numel() for p in ll.trainable_parameters(model)) == want
    adapter = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in SHARED]
    assert len(adapter) == 2, adapter


def test_shared_tensors_stay_one_tensor_through_dtype_moves_and_the_hooks_follow():
    model = make_model()
    ll.attach(model, ll.from_spec("vera"))
    perturb(model)
    model.to(torch.bfloat16)
    for k, ptrs in shared_ptrs(model).items():
        assert len(ptrs) == 1, k
    t = next(iter(ll.state(model).targets.values()))
    assert t.module.lora_vera_A.dtype == torch.bfloat16
    out = model(torch.randint(0, 64, (2, 5)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_the_same_seed_gives_the_same_a_and_b_and_another_seed_others():
    a, b, c = make_model(), make_model(), make_model()
    ll.attach(a, ll.from_spec("vera", r=8))
    ll.attach(b, ll.from_spec("vera", r=8))
    ll.attach(c, ll.from_spec("vera", r=8, projection_prng_key=1))
    get = lambda m: next(iter(ll.state(m).targets.values())).module.lora_vera_A  # noqa: E731
    assert torch.equal(get(a), get(b)) and not torch.equal(get(a), get(c))


def test_named_adapters_each_share_their_own_pair():
    model = make_model()
    ll.attach(model, ll.from_spec("vera", r=8))
    ll.attach(model, ll.from_spec("vera", r=16, projection_prng_key=3), name="math")
    mine, other = shared_ptrs(model), shared_ptrs(model, "math")
    assert all(len(p) == 1 for p in (*mine.values(), *other.values()))
    assert mine["lora_vera_A"] != other["lora_vera_A"]
    t = next(iter(ll.state(model, "math").targets.values()))
    assert t.holder.lora_vera_A.shape[0] == 16
    ll.detach(model, name="math")
    assert not any(k.startswith("lora_lite_math") or ".lora_lite_math." in k for k in model.state_dict())


def test_checkpoint_stores_a_and_b_once_and_loads_them_exactly(tmp_path):
    model = make_model()
    ll.attach(model, ll.from_spec("vera"))
    perturb(model)
    want = logits(model)
    path = ll.save(model, tmp_path / "vera.safetensors")
    with checkpoint._File(path) as ck:
        keys = sorted(ck.table)
    assert [k for k in keys if k.startswith("shared.")] == ["shared.lora_vera_A", "shared.lora_vera_B"]
    assert not [k for k in keys if not k.startswith("shared.") and k.rsplit(".", 1)[-1] in SHARED]
    assert len(keys) == 2 + 2 * len(ll.state(model).targets)
    fresh = make_model()
    ll.load(fresh, path)
    assert torch.equal(logits(fresh), want)
    assert all(len(p) == 1 for p in shared_ptrs(fresh).values())
    A = next(iter(ll.state(model).targets.values())).module.lora_vera_A
    assert torch.equal(next(iter(ll.state(fresh).targets.values())).module.lora_vera_A, A)


def _rewrite(path, out, fn):
    """A copy of checkpoint `path` with its tensors edited by fn(tensors), re-signed (as a crafter would)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header.pop("__metadata__")["lora_lite"])
    data = raw[8 + n :]
    tensors = {
        k: torch.frombuffer(bytearray(data[v["data_offsets"][0] : v["data_offsets"][1]]), dtype=torch.float32)
        .reshape(v["shape"])
        .clone()
        for k, v in header.items()
    }
    fn(tensors)
    meta["sha256"] = checkpoint.digest(meta, tensors)
    out.write_bytes(st_bytes(tensors, metadata={"lora_lite": json.dumps(meta)}))
    return out


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda t: t.__setitem__("shared.lora_vera_A", t["shared.lora_vera_A"][:, :16].contiguous()), "has shape"),
        (lambda t: t.__setitem__("shared.lora_vera_B", t["shared.lora_vera_B"][:16].contiguous()), "has shape"),
        (lambda t: t.pop("shared.lora_vera_B"), "missing"),
        (lambda t: t["shared.lora_vera_A"].__setitem__((0, 0), float("nan")), "NaN"),
        (lambda t: t.__setitem__("shared.lora_extra", torch.zeros(2)), "is not a tensor of vera"),
    ],
)
def test_a_crafted_checkpoint_with_bad_shared_tensors_is_refused_in_one_line_naming_it(tmp_path, edit, fragment):
    model = make_model()
    ll.attach(model, ll.from_spec("vera", r=8))
    good = ll.save(model, tmp_path / "good.safetensors")
    bad = _rewrite(good, tmp_path / "bad.safetensors", edit)
    target = make_model()
    snap = snapshot(target)
    with pytest.raises(ll.CheckpointError) as info:
        ll.load(target, bad)
    msg = str(info.value)
    assert len(msg.splitlines()) == 1 and fragment in msg and "tensor 'shared.lora_" in msg, msg
    assert_unchanged(target, snap)


def test_merge_folds_the_sliced_update_into_each_weight():
    model = make_model()
    ll.attach(model, ll.from_spec("vera", r=8))
    perturb(model)
    want = logits(model)
    ll.merge(model)
    assert ll.state(model) is None
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=1e-5)


def test_export_and_load_peft_round_trip_and_a_bad_shared_shape_is_refused(tmp_path):
    from conftest import hf_llama

    model = hf_llama()
    ll.attach(model, ll.from_spec("vera", r=8, projection_prng_key=5))
    perturb(model)
    ll.export_peft(model, tmp_path)  # PEFT's VERA layout (tests/test_deploy.py loads it in PEFT)
    back = hf_llama()
    ll.load_peft(back, tmp_path)
    ids = torch.arange(8)[None]
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
    assert all(len(p) == 1 for p in shared_ptrs(back).values())
    weights = tmp_path / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"][:, :16].contiguous()
    save_file(tensors, weights)
    target = hf_llama()
    snap = snapshot(target)
    with pytest.raises(ll.CheckpointError) as info:
        ll.load_peft(target, tmp_path)
    msg = str(info.value)
    assert len(msg.splitlines()) == 1 and "base_model.vera_A has shape" in msg, msg
    assert_unchanged(target, snap)


def test_trainer_resume_restores_the_lambdas_and_keeps_quiet_about_the_shared_keys(tmp_path):
    import logging

    import transformers

    from conftest import hf_llama
    from lora_lite.hf import BaseWeightsNotMissing

    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (8, 8))]
    args = transformers.TrainingArguments(
        str(tmp_path), max_steps=2, save_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True
    )
    model = hf_llama()
    ll.attach(model, ll.from_spec("vera", r=8))
    ll.AdapterTrainer(model=model, args=args, train_dataset=data).train()
    want = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    again = hf_llama()
    ll.attach(again, ll.from_spec("vera", r=8))
    ll.AdapterTrainer(model=again, args=args, train_dataset=data).train(resume_from_checkpoint=True)
    got = dict(again.named_parameters())
    assert want and all(torch.equal(got[n], t) for n, t in want.items())
    record = lambda keys: logging.LogRecord(
        "t", 30, "", 0, f"There were unexpected keys in the checkpoint model loaded: {keys}.", None, None
    )  # noqa: E501, E731
    quiet = BaseWeightsNotMissing()
    assert not quiet.filter(record(["shared.lora_vera_A", "shared.lora_vera_B"]))
    assert quiet.filter(record(["shared.lora_vera_A", "model.layers.0.other"]))


def test_load_peft_refuses_a_vera_directory_saved_without_its_projections(tmp_path):
    model = make_model()
    ll.attach(model, ll.from_spec("vera", r=8))
    ll.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "save_projection": False}))
    target = make_model()
    snap = snapshot(target)
    with pytest.raises(ll.CheckpointError) as info:
        ll.load_peft(target, tmp_path)
    msg = str(info.value)
    assert len(msg.splitlines()) == 1 and "save_projection=False" in msg, msg
    assert_unchanged(target, snap)
