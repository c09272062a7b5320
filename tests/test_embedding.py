"""nn.Embedding targets: LoRA, rsLoRA and DoRA in PEFT's layout (parity: test_peft_parity.py);
every other variant and max_norm refused by name; a tied embedding is never written while attached, and
merge unties it."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll
from conftest import SPECS, ScaledEmbedding, assert_unchanged, hf_llama, llama, perturb, snapshot, token_batch

transformers = pytest.importorskip("transformers")
EMBEDDERS = [n for n in SPECS if ll.variant_module(n).EMBEDDING]
EMB = "model.embed_tokens"


def out(model, batch=None) -> torch.Tensor:
    batch = batch or {"input_ids": token_batch(seed=7)["input_ids"]}
    with torch.no_grad():
        return model(**batch).logits


def test_lora_rslora_and_dora_are_the_embedding_specs():
    assert EMBEDDERS == ["dora", "lora", "rslora"]


@pytest.mark.parametrize("name", EMBEDDERS)
def test_embedding_adapter_is_identity_trains_only_its_tensors_saves_loads_and_detaches(name, tmp_path):
    model = llama()
    base, snap = out(model), snapshot(model)
    ll.attach(model, ll.from_spec(name, r=4, target_names=["embed_tokens"]))
    assert list(ll.state(model).targets) == [EMB]
    assert torch.equal(out(model), base)  # A = 0: the lookup adds exactly zero
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(EMB + ".lora_") for n in trainable), trainable
    perturb(model)
    batch = {"input_ids": token_batch(seed=3)["input_ids"]}
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ll.trainable_parameters(model))
    assert model.model.embed_tokens.weight.grad is None
    adapted = out(model)
    assert (adapted - base).abs().max() > 1e-3
    path = ll.save(model, tmp_path / "a.safetensors")
    fresh = llama()
    ll.load(fresh, path)
    assert torch.equal(out(fresh), adapted)
    for p in model.parameters():
        p.grad = None
    ll.detach(model)
    assert_unchanged(model, snap)


def test_named_embedding_adapter_composes_with_the_default_and_scales():
    model = llama()
    base = out(model)
    ll.attach(model, ll.from_spec("lora", r=2, target_names=["embed_tokens"]))
    ll.attach(model, ll.from_spec("dora", r=2, target_names=["embed_tokens"]), name="extra")
    assert torch.equal(out(model), base)
    perturb(model)
    adapted = out(model)
    assert (adapted - base).abs().max() > 1e-3
    with ll.disabled(model):
        assert torch.equal(out(model), base)
    ll.scale(model, 0.0)
    assert torch.equal(out(model), base)
    ll.scale(model, 1.0)
    assert torch.equal(out(model), adapted)


def test_tied_embedding_is_adapted_without_writing_the_shared_weight():
    model = hf_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    W = model.lm_head.weight.detach().clone()
    base = out(model)
    ll.attach(model, ll.from_spec("dora", r=2, target_names=["embed_tokens"]))
    perturb(model)
    assert (out(model) - base).abs().max() > 1e-3
    assert torch.equal(model.lm_head.weight, W)
    ll.detach(model)
    assert torch.equal(out(model), base)


@pytest.mark.parametrize("name", [n for n in SPECS if n not in EMBEDDERS])
def test_other_variants_refuse_an_embedding_naming_layer_and_type(name):
    model = hf_llama(tie=True)  # SVD variants would crop the weight lm_head shares
    snap = snapshot(model)
    with pytest.raises(ll.AttachError, match=rf"^{name}: {EMB} is an Embedding; {name} does not adapt embeddings"):
        ll.attach(model, ll.from_spec(name, target_names=["embed_tokens"]), calibration_data=[])
    assert_unchanged(model, snap)


def test_max_norm_embedding_is_refused():
    model = llama()
    model.model.embed_tokens.max_norm = 1.0
    snap = snapshot(model)
    with pytest.raises(ll.AttachError, match=rf"^lora: {EMB} is an Embedding with max_norm=1.0, which renormalises"):
        ll.attach(model, ll.from_spec("lora", target_names=["embed_tokens"]))
    assert_unchanged(model, snap)


def test_a_quantized_embedding_is_refused():
    bnb = pytest.importorskip("bitsandbytes")
    model = torch.nn.Module()
    model.codes = bnb.nn.Embedding8bit(10, 4)  # its state_dict raises: check what attach could touch
    flag = model.codes.weight.requires_grad
    with pytest.raises(ll.AttachError, match=r"^lora: codes is a quantized \(int8\) Embedding8bit; lora-lite adapts"):
        ll.attach(model, ll.from_spec("lora", r=2, target_names=["codes"]))
    assert ll.state(model) is None and model.codes.weight.requires_grad == flag
    assert not model.codes._forward_hooks and not any(".lora_" in k for k in dict(model.named_parameters()))


def test_a_broad_pattern_skips_embed_tokens_but_any_embedding_it_matches_by_another_name_is_a_target():
    model = llama()
    ll.attach(model, ll.from_spec("lora", r=2, target_names=["."]))
    assert not any("embed" in n or "lm_head" in n for n in ll.state(model).targets)
    block = torch.nn.Module()
    block.codes = torch.nn.Embedding(10, 4)
    ll.attach(block, ll.from_spec("lora", r=2, target_names=["codes"]))
    assert list(ll.state(block).targets) == ["codes"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name, scaled", [("lora", False), ("dora", False), ("lora", True), ("dora", True)])
def test_merge_folds_an_embedding_target_and_q_proj_into_the_weights(name, scaled):
    model = llama()
    if scaled:  # Gemma-style embed_scale: the update is scaled with the rows, merge divides it back out
        model.model.embed_tokens = ScaledEmbedding(model.model.embed_tokens.weight.detach(), 0, 3.0)
    ll.attach(model, ll.from_spec(name, r=4, target_names=["embed_tokens", "q_proj"]))
    perturb(model)
    adapted, base = out(model), None
    with ll.disabled(model):
        base = out(model)
    assert rel(adapted, base) > 1e-3
    ll.merge(model)
    assert ll.state(model) is None and not any("lora_" in n for n, _ in model.named_parameters())
    assert rel(out(model), adapted) < 1e-5


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_merge_unties_a_tied_embedding_so_lm_head_keeps_the_base_weight(name, tmp_path):
    model = hf_llama(tie=True)
    W = model.lm_head.weight.detach().clone()
    ll.attach(model, ll.from_spec(name, r=4, target_names=["embed_tokens", "q_proj"]))
    perturb(model)
    adapted = out(model)
    ll.merge(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, W) and not torch.equal(model.model.embed_tokens.weight, W)
    assert model.config.tie_word_embeddings is False
    assert rel(out(model), adapted) < 1e-5
    model.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(out(reloaded), out(model))


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_export_peft_writes_peft_embedding_names_and_load_peft_reads_them(name, tmp_path):
    peft = pytest.importorskip("peft")
    model = llama()
    ll.attach(model, ll.from_spec(name, r=4, alpha=8.0, target_names=["embed_tokens", "q_proj"]))
    perturb(model)
    adapted = out(model)
    d = ll.export_peft(model, tmp_path / "peft")
    from safetensors import safe_open

    with safe_open(str(d / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert f"base_model.model.{EMB}.lora_embedding_A" in keys and f"base_model.model.{EMB}.lora_embedding_B" in keys
    theirs = peft.PeftModel.from_pretrained(llama(), str(d)).eval()
    assert (out(theirs) - adapted).abs().max() / adapted.abs().max() < 1e-5
    fresh = llama()
    ll.load_peft(fresh, d)
    assert (out(fresh) - adapted).abs().max() / adapted.abs().max() < 1e-6


def test_load_peft_refuses_an_embedding_for_a_spec_without_embeddings(tmp_path):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights="pissa"))
    pm.save_pretrained(str(tmp_path / "p"))
    model = llama()
    snap = snapshot(model)
    with pytest.raises(ll.CheckpointError, match=rf"target {EMB} is an nn.Embedding, which lora-lite's pissa does not"):
        ll.load_peft(model, tmp_path / "p")
    assert_unchanged(model, snap)


def test_sparse_embedding_trains_with_a_dense_adapter_gradient_equal_to_the_dense_layers():
    grads = {}
    for sparse in (False, True):
        model = llama()
        model.model.embed_tokens.sparse = sparse
        ll.attach(model, ll.from_spec("lora", r=2, target_names=["embed_tokens"]))
        perturb(model)
        batch = {"input_ids": token_batch(seed=3)["input_ids"]}
        model(**batch, labels=batch["input_ids"]).loss.backward()
        params = ll.trainable_parameters(model)
        assert all(p.grad is not None and p.grad.layout == torch.strided for p in params)
        grads[sparse] = [p.grad.clone() for p in params]
        torch.optim.AdamW(params).step()  # AdamW takes no sparse gradient
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True]))


@pytest.mark.parametrize("tie", [False, True])
def test_load_peft_reads_peft_default_save_of_an_embedding_adapter_with_its_base_table_copy(tie, tmp_path):
    """PEFT's save_pretrained adds the target embedding's base weight when target_modules name an
    embedding (save_embedding_layers="auto"); equal to the model's, it is accepted and unused."""
    peft = pytest.importorskip("peft")
    pcfg = peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(hf_llama(tie=tie), pcfg).eval()
    pm.save_pretrained(str(tmp_path / "p"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "p" / "adapter_model.safetensors"), framework="pt") as f:
        assert f"base_model.model.{EMB}.base_layer.weight" in set(f.keys())
    model = hf_llama(tie=tie)
    ll.load_peft(model, tmp_path / "p")
    assert (out(model) - out(pm)).abs().max() / out(pm).abs().max() < 1e-6


def test_load_peft_refuses_a_base_table_copy_that_differs_from_the_models_embedding(tmp_path):
    peft = pytest.importorskip("peft")
    pcfg = peft.LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False)
    peft.get_peft_model(hf_llama(seed=0), pcfg).save_pretrained(str(tmp_path / "p"))
    model = hf_llama(seed=1)  # another embedding table of the same shape
    snap = snapshot(model)
    with pytest.raises(ll.CheckpointError) as e:
        ll.load_peft(model, tmp_path / "p")
    text = str(e.value)
    assert "\n" not in text and f"{EMB}.base_layer.weight differs from this model's {EMB}.weight" in text, text
    assert_unchanged(model, snap)


def test_an_empty_embedding_is_refused_naming_its_sizes():
    block = torch.nn.Module()
    block.codes = torch.nn.Embedding(0, 4)
    snap = snapshot(block)
    with pytest.raises(ll.AttachError, match=r"^lora: codes: \(num_embeddings, embedding_dim\) = \(0, 4\), expected"):
        ll.attach(block, ll.from_spec("lora", r=2, target_names=["codes"]))
    assert_unchanged(block, snap)
