"""Properties every shipped spec must have, on a tiny Llama-shaped model in fp32:
identity at init, only adapter tensors trainable, live gradients, save -> fresh model -> load,
load -> save lossless, detach gives the base model back."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import lora_lite as ll
from conftest import (
    NOT_IDENTITY_AT_INIT,
    SPECS,
    attach_small,
    lm_loss,
    logits,
    make_model,
    perturb,
    smollm2_shaped_layer,
    token_batch,
)


@pytest.mark.parametrize("name", SPECS)
def test_identity_at_init(name):
    model = make_model()
    base = logits(model)
    attach_small(model, name)
    if name in NOT_IDENTITY_AT_INIT:
        assert not torch.allclose(logits(model), base), NOT_IDENTITY_AT_INIT[name]
        torch.testing.assert_close(logits(model), base, atol=0.5, rtol=0.1)
    else:
        torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", SPECS)
def test_only_adapter_tensors_trainable_and_gradients_reach_them(name):
    model = make_model()
    attach_small(model, name)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "no trainable tensors"
    gen = ll.state(model).variant
    want = {k for k, (_, _, tr) in gen.PARAMS.items() if tr}
    assert {n.rsplit(".", 1)[1] for n in trainable} == want
    assert all(n.rsplit(".", 1)[1].startswith("lora_") for n in trainable)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    for _ in range(2):  # after one step even a zero-initialised B lets A receive gradient
        opt.zero_grad()
        lm_loss(model, token_batch(seed=3)).backward()
        opt.step()
    for n, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {n}"
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


@pytest.mark.parametrize("name", SPECS)
def test_save_fresh_model_load_same_outputs_and_lossless_resave(name, tmp_path):
    model = make_model()
    attach_small(model, name)
    perturb(model)
    expected = logits(model)
    path = ll.save(model, tmp_path / "a.safetensors")
    fresh = make_model()
    ll.load(fresh, path)  # no calibration data needed
    assert torch.equal(logits(fresh), expected)  # bit for bit: same tensors, same layout, same GEMMs
    ll.save(fresh, tmp_path / "b.safetensors")
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (
        ll.read_metadata(tmp_path / "a.safetensors")["targets"].keys()
        == ll.read_metadata(tmp_path / "b.safetensors")["targets"].keys()
    )


@pytest.mark.parametrize("name", SPECS)
def test_detach_restores_state_dict_flags_and_outputs(name):
    model = make_model()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a flag attach must restore
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    base = logits(model)
    attach_small(model, name)
    perturb(model)
    ll.detach(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=1e-6, rtol=1e-6, msg=k)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=1e-5)
    assert not any("lora_" in n for n, _ in model.named_buffers())
    assert ll.state(model) is None


@pytest.mark.parametrize("name", SPECS)
def test_bf16_adapter_dtype_identity_and_output_dtype(name):
    model = make_model()
    base = logits(model)
    attach_small(model, name, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ll.trainable_parameters(model))
    out = logits(model)
    assert out.dtype == torch.float32
    if name not in NOT_IDENTITY_AT_INIT:
        torch.testing.assert_close(out, base, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", SPECS)
def test_bf16_model_with_fp32_adapters(name, monkeypatch):
    """PEFT's default mixed setup. The hook hands forward() x in the adapter dtype unless the
    module says CAST_INPUT = False (then in the layer's); the output stays bf16 and gradients
    reach the fp32 adapter tensors."""
    gen = ll.variant_module(name)
    seen = set()
    forward = gen.forward

    def spy(m, x, *rest):
        seen.add(x.dtype)
        return forward(m, x, *rest)

    monkeypatch.setattr(gen, "forward", spy)
    model = make_model().to(torch.bfloat16)
    base = logits(model)
    attach_small(model, name, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in ll.trainable_parameters(model))
    if name not in NOT_IDENTITY_AT_INIT:
        torch.testing.assert_close(logits(model), base, atol=2e-2, rtol=2e-2)
    perturb(model)
    batch = token_batch(seed=3)
    out = model(**batch)
    assert out.dtype == torch.bfloat16
    assert seen == {torch.float32 if gen.CAST_INPUT else torch.bfloat16}
    assert gen.CAST_INPUT == (name not in ("ia3", "ia3_ff"))
    lm_loss(model, batch).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name", SPECS)
def test_attaches_at_its_defaults_to_a_smollm2_shaped_layer(name):
    """PEFT's defaults (RoAd's group_size 64, OFT's block size 32, ranks up to 256) fit SmolLM2's
    576 -> 192 projections: identity at init, and detach gives the base back."""
    pytest.importorskip("transformers")
    model = smollm2_shaped_layer()
    batch = {"input_ids": token_batch(seed=7)["input_ids"]}
    data = [{"input_ids": token_batch(seed=100 + i, batch=1, seq=320)["input_ids"]} for i in range(2)]  # 640 >= d_in
    with torch.no_grad():
        base = model(**batch).logits
    ll.attach(model, ll.from_spec(name), calibration_data=data, progress=False)
    assert ll.state(model).targets, "no target"
    with torch.no_grad():
        out = model(**batch).logits
    if name in NOT_IDENTITY_AT_INIT:
        assert not torch.allclose(out, base)
    else:
        torch.testing.assert_close(out, base, atol=1e-4, rtol=1e-4)
    ll.detach(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base, atol=1e-5, rtol=1e-5)
