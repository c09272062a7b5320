"""ll.AdapterTrainer: Hugging Face Trainer checkpoints that hold only the adapter, exact resume."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import lora_lite as ll
from conftest import hf_llama

transformers = pytest.importorskip("transformers")


def dataset(n: int = 16, seq: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, seq), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def args(out, steps: int, **kw):
    return transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        warmup_steps=1,
        use_cpu=True,
        report_to=[],
        seed=0,
        data_seed=0,
        logging_steps=100,
        disable_tqdm=True,
        **kw,
    )


def adapted(spec: str = "lora"):
    model = hf_llama().train()
    ll.attach(model, ll.from_spec(spec, r=4))
    return model


def adapter_tensors(model) -> dict:
    st = ll.state(model)
    return {f"{n}.{k}": getattr(t.module, k).detach().clone() for n, t in st.targets.items() for k in t.tensors}


@pytest.mark.parametrize("spec", ["lora", "pissa"])
def test_resume_gives_the_uninterrupted_run_and_checkpoints_hold_only_the_adapter(spec, tmp_path):
    straight = adapted(spec)
    ll.AdapterTrainer(model=straight, args=args(tmp_path / "a", 4), train_dataset=dataset()).train()
    want = adapter_tensors(straight)

    ckpt = tmp_path / "a" / "checkpoint-2"
    weights = sorted(p.name for p in ckpt.iterdir() if p.suffix in (".safetensors", ".bin") and "model" in p.name)
    assert weights == ["model.safetensors"]
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(want)  # the adapter tensors, nothing of the base
    assert ll.read_metadata(ckpt / "model.safetensors")["spec_name"] == spec

    resumed = adapted(spec)
    trainer = ll.AdapterTrainer(model=resumed, args=args(tmp_path / "b", 4), train_dataset=dataset())
    trainer.train(resume_from_checkpoint=str(ckpt))
    got = adapter_tensors(resumed)
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6
    assert any((want[k] != adapter_tensors(adapted(spec))[k]).any() for k in want)  # it trained


def test_a_checkpoint_of_another_variant_is_refused_before_loading(tmp_path):
    ll.AdapterTrainer(model=adapted("lora"), args=args(tmp_path / "a", 2), train_dataset=dataset()).train()
    other = adapted("dora")
    trainer = ll.AdapterTrainer(model=other, args=args(tmp_path / "b", 4), train_dataset=dataset())
    before = adapter_tensors(other)
    with pytest.raises(ll.CheckpointError, match="holds a lora adapter"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert all(torch.equal(before[k], v) for k, v in adapter_tensors(other).items())


def test_a_model_without_adapter_is_refused(tmp_path):
    with pytest.raises(ll.AttachError, match="attach an adapter first"):
        ll.AdapterTrainer(model=hf_llama(), args=args(tmp_path, 1))


def test_trains_a_bitsandbytes_4bit_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    hf_llama().save_pretrained(tmp_path / "base")
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    load = transformers.AutoModelForCausalLM.from_pretrained
    model = load(tmp_path / "base", quantization_config=q, device_map="cpu")
    assert model.is_quantized
    with pytest.raises(ValueError, match="purely quantized"):  # what Trainer says without an adapter
        transformers.Trainer(model=model, args=args(tmp_path / "t", 2))
    ll.attach(model, ll.from_spec("lora", r=4))
    before = adapter_tensors(model)
    ll.AdapterTrainer(model=model, args=args(tmp_path / "out", 2), train_dataset=dataset()).train()
    assert model.is_quantized  # set back after Trainer's check
    after = adapter_tensors(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    fresh = load(tmp_path / "base", quantization_config=q, device_map="cpu")
    ll.load(fresh, tmp_path / "out" / "checkpoint-2" / "model.safetensors")
    assert all(torch.equal(v, after[k]) for k, v in adapter_tensors(fresh).items())


def test_resume_does_not_warn_about_the_base_weights(tmp_path, caplog):
    ll.AdapterTrainer(model=adapted(), args=args(tmp_path / "a", 2), train_dataset=dataset()).train()
    trainer = ll.AdapterTrainer(model=adapted(), args=args(tmp_path / "b", 4), train_dataset=dataset())
    with caplog.at_level("WARNING"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    assert not [r for r in caplog.records if "missing keys" in r.getMessage()]
