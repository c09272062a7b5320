"""Behaviour specific to DoRA, DeLoRA, HRA and EVA beyond the shared properties: refusals that
name the layer and leave the model unchanged, HRA's compact WY form against the dense product,
DoRA's norm following the current W, EVA's token counting, checkpoints refusing another base."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll
import lora_lite.runtime as rt
from conftest import calibration, logits, make_model, perturb, token_batch
from lora_lite.calibration import collect_input_stats


def assert_untouched(model, before):
    assert ll.state(model) is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_hra_odd_rank_is_refused_naming_the_layer_and_model_is_unchanged():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"hra: model\.layers\.0\.self_attn\.q_proj: r=3 is odd.*use an even r"):
        ll.attach(model, ll.from_spec("hra", r=3))
    assert_untouched(model, before)


def test_hra_compact_wy_form_equals_the_dense_product_of_reflections():
    gen = ll.variant_module("hra")
    cfg = gen.Config(r=6)
    layer = torch.nn.Linear(10, 7)
    torch.manual_seed(0)
    layer.lora_hra_u = torch.nn.Parameter(torch.randn(10, 6, dtype=torch.float64))
    x = torch.randn(3, 5, 10, dtype=torch.float64)
    R = torch.eye(10, dtype=torch.float64)  # H_1 H_2 ... H_r, as PEFT builds it
    for k in range(6):
        v = layer.lora_hra_u[:, k : k + 1] / layer.lora_hra_u[:, k].norm()
        R = R - 2 * R @ v @ v.T
    got = gen.forward(layer, x, cfg)
    torch.testing.assert_close(got, x @ R.T, atol=1e-12, rtol=0)


def test_dora_norm_follows_the_current_weight():
    # y = m (W x) / ||W||_row at init: scaling W leaves y unchanged unless a stale norm is cached
    model = make_model()
    ll.attach(model, ll.from_spec("dora", r=4))
    before = logits(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(3.0)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)


def _write_through(how: str, model, w_new: torch.Tensor) -> None:
    """Replace the q_proj weight of layer 0 with w_new by one of the ways users write weights."""
    lin = model.model.layers[0].self_attn.q_proj
    if how == "load_state_dict":
        sd = model.state_dict()
        sd["model.layers.0.self_attn.q_proj.weight"] = w_new
        model.load_state_dict(sd)
    elif how == "copy_ under no_grad":
        with torch.no_grad():
            lin.weight.copy_(w_new)
    elif how == "W.data.copy_":
        lin.weight.data.copy_(w_new)
    elif how == "W.data =":
        lin.weight.data = w_new.clone()
    elif how == "a new parameter":
        lin.weight = torch.nn.Parameter(w_new.clone(), requires_grad=False)
    elif how == "model.to(dtype)":
        model.to(torch.float64)  # W's new storage holds the old values in fp64: write the new ones too
        with torch.no_grad():
            lin.weight.copy_(w_new)
    elif how == "an optimizer step":
        lin.weight.requires_grad_(True)
        lin.weight.grad = lin.weight.detach() - w_new.to(lin.weight.dtype)
        torch.optim.SGD([lin.weight], lr=1.0).step()
    else:
        raise AssertionError(how)


WRITES = ["load_state_dict", "copy_ under no_grad", "W.data.copy_", "W.data =", "a new parameter",
          "model.to(dtype)", "an optimizer step"]  # fmt: skip


def _dora_model_after(how: str):
    model = make_model()
    ll.attach(model, ll.from_spec("dora", r=4))
    perturb(model, scale=0.3)
    logits(model)  # a forward before the write: anything it kept must not go stale
    lin = model.model.layers[0].self_attn.q_proj
    w_new = 3.0 * torch.randn(lin.weight.shape, generator=torch.Generator().manual_seed(3))
    _write_through(how, model, w_new)
    return model, lin


@pytest.mark.parametrize("how", WRITES)
def test_dora_row_norms_follow_every_write_to_a_float_weight(how):
    model, lin = _dora_model_after(how)
    W = lin.weight.detach()
    torch.testing.assert_close(rt.base_row_sqnorm(lin), W.double().square().sum(1).float(), rtol=1e-6, atol=0)
    assert rt.SQNORM_ATTR not in lin.__dict__  # float weights: nothing cached


# the forward after a dtype move of the whole model (adapters included) is the dtype-move tests' business
@pytest.mark.parametrize("how", [w for w in WRITES if w != "model.to(dtype)"])
def test_dora_forward_after_a_weight_write_matches_the_dense_formula(how):
    model, lin = _dora_model_after(how)
    W, s = lin.weight.detach(), 16.0 / 4
    x = torch.randn(3, 32)
    with torch.no_grad():
        A, B, mag = lin.lora_A, lin.lora_B, lin.lora_magnitude_vector
        V = W + s * B @ A  # (o, i), the dense form the hook never builds
        want = mag / V.norm(dim=1) * (x @ W.T + s * (x @ A.T) @ B.T)
        got = lin(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dora_compiles_without_graph_breaks():
    model = make_model()
    ll.attach(model, ll.from_spec("dora", r=4))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**token_batch())
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_base_forward_of_a_bf16_weight_runs_in_bf16_and_returns_fp32():
    lin = torch.nn.Linear(64, 32, bias=True).to(torch.bfloat16)
    A = torch.randn(4, 64)
    got = rt.base_forward(lin, A)  # (r, o) = A W^T, no bias, no fp32 copy of W
    assert got.dtype == torch.float32 and got.shape == (4, 32)
    torch.testing.assert_close(got, A.bfloat16().float() @ lin.weight.float().T, atol=2e-2, rtol=2e-2)


def test_dora_on_a_bf16_model_with_fp32_adapters_matches_the_dense_formula():
    model = make_model().to(torch.bfloat16)
    ll.attach(model, ll.from_spec("dora", r=4, dtype="float32"))
    perturb(model, scale=0.3)
    t = ll.state(model).targets["model.layers.0.self_attn.q_proj"]
    m, s = t.module, t.cfg.alpha / t.cfg.r
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        got = m(x)
        W = m.weight.float()
        V = W + s * (m.lora_B @ m.lora_A)  # (o, i) the dense form the forward avoids
        want = m.lora_magnitude_vector / V.norm(dim=1) * (x.float() @ W.T + s * (x.float() @ m.lora_A.T) @ m.lora_B.T)
        if m.bias is not None:
            want = want + m.bias.float()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2 * want.abs().max().item(), rtol=0)


def test_eva_needs_calibration_data_and_more_tokens_than_r():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.AttachError, match="eva needs calibration_data"):
        ll.attach(model, ll.from_spec("eva", r=4))
    assert_untouched(model, before)
    few = [token_batch(seed=1, batch=1, seq=4)]  # 4 tokens, r = 4
    with pytest.raises(ValueError, match=r"eva: model\.layers\.0\.self_attn\.q_proj: .*more than r=4 .*got 4"):
        ll.attach(model, ll.from_spec("eva", r=4), calibration_data=few, progress=False)
    assert_untouched(model, before)


def test_calibration_skips_padding_and_label_masked_tokens():
    model = make_model()
    targets = {"q": model.model.layers[0].self_attn.q_proj}
    batch = token_batch(seed=2, batch=3, seq=8, pad=2)
    labels = batch["input_ids"].clone()
    labels[1, :5] = -100
    with_labels = collect_input_stats(model, targets, [{**batch, "labels": labels}], progress=False)["q"]
    mask = batch["attention_mask"].clone()
    mask[1, :5] = 0
    as_mask = collect_input_stats(model, targets, [{**batch, "attention_mask": mask}], progress=False)["q"]
    assert with_labels["tokens"] == 3 * 8 - 2 - 5
    for k in ("second_moment", "mean"):
        torch.testing.assert_close(with_labels[k], as_mask[k])
    # the mean is the plain mean of the counted inputs
    seen = []
    h = targets["q"].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(**batch)
    h.remove()
    keep = (mask.bool()).reshape(-1)
    torch.testing.assert_close(with_labels["mean"], seen[0].reshape(-1, 32)[keep].mean(0))


@pytest.mark.parametrize("name", ["dora", "delora"])
def test_checkpoint_refuses_a_base_with_other_weights(name, tmp_path):
    model = make_model()
    ll.attach(model, ll.from_spec(name, r=4))
    perturb(model)
    path = ll.save(model, tmp_path / "a.safetensors")
    other = make_model(seed=1)
    with pytest.raises(ll.CheckpointError, match=f"{name}'s math depends on W, refusing to load"):
        ll.load(other, path)
    assert ll.state(other) is None


def test_new_variants_run_on_calibration_and_typed_configs():
    assert type(ll.from_spec("dora")) is ll.DoRAConfig
    assert ll.DeLoRAConfig().lambda0 == 15.0 and ll.HRAConfig().r % 2 == 0
    model = make_model()
    ll.attach(model, ll.EVAConfig(r=4), calibration_data=calibration(), progress=False)
    A = ll.state(model).targets["model.layers.0.self_attn.q_proj"].module.lora_A
    torch.testing.assert_close(A @ A.T, torch.eye(4), atol=1e-5, rtol=0)  # orthonormal directions
