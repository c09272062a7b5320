"""Quantized bases: bitsandbytes Linear4bit (nf4, fp4) and Linear8bitLt (int8) targets.

Every shipped spec (the ones with a frozen part in residual subtract) on a tiny Llama-shaped
model whose linear layers are quantized (lm_head and embeddings stay float): identity at init,
a few training steps lower the loss (gradients pass through the quantized layers), and save ->
fresh quantized model -> load reproduces the outputs. Then the refusals (crop, a spec that
declares quantized_base: false), cross loads float <-> quantized, and the runtime's three ways
of reading a quantized W (base_weight, base_forward, base_row_sqnorm).

Device-agnostic: the `device` fixture is "cuda" when a GPU is there and bitsandbytes runs on
it, else "cpu" (bitsandbytes 0.50 runs both layer kinds on the CPU).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_lite as ll
import lora_lite.runtime as rt
from conftest import (
    NOT_IDENTITY_AT_INIT,
    SPECS,
    assert_unchanged,
    calibration,
    lm_loss,
    perturb,
    small_cfg,
    snapshot,
    token_batch,
)
from lora_lite.tiny import tiny_lm

bnb = pytest.importorskip("bitsandbytes")
from lora_lite.testing import quantize  # noqa: E402 (needs bitsandbytes)

FROZEN = [n for n in SPECS if ll.variant_module(n).RESIDUAL != "none"]  # pissa and the AntiPaSTO family
FP4_SUBSET = ["lora", "dora", "pissa", "antipasto_arrow"]
CASES = [(n, k) for n in SPECS for k in ("nf4", "int8")] + [(n, "fp4") for n in FP4_SUBSET]


def _pick_device() -> str:
    if torch.cuda.is_available():
        try:
            layer = quantize(nn.ModuleDict({"l": nn.Linear(64, 64)}), "nf4", device="cuda")["l"]
            layer(torch.randn(2, 64, device="cuda"))
            return "cuda"
        except Exception:  # a CUDA build of torch without a CUDA bitsandbytes
            pass
    return "cpu"


DEVICE = _pick_device()


@pytest.fixture
def device() -> str:
    return DEVICE


def qmodel(kind: str, device: str, seed: int = 0):
    """TinyLM with d=64 (4-bit blocks of 64 fit every layer), its nn.Linear layers quantized."""
    return quantize(tiny_lm(seed=seed, d=64, d_ff=128), kind, device=device).eval()


def batch(seed: int, device: str) -> dict:
    return {k: v.to(device) for k, v in token_batch(seed=seed).items()}


def out(model, b: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**b).float()


def qcfg(name: str, **kw):
    if name in FROZEN:
        kw.setdefault("residual", "subtract")
    return small_cfg(name, **kw)


@pytest.mark.parametrize("name, kind", CASES)
def test_identity_train_save_load_on_quantized_base(name, kind, device, tmp_path):
    model = qmodel(kind, device)
    b = batch(7, device)
    base = out(model, b)
    torch.manual_seed(0)
    ll.attach(model, qcfg(name), calibration_data=calibration(), progress=False)
    assert {rt.quantization(t.module) for t in ll.state(model).targets.values()} == {kind}
    if name in NOT_IDENTITY_AT_INIT:
        torch.testing.assert_close(out(model, b), base, atol=0.5, rtol=0.1)
    else:
        torch.testing.assert_close(out(model, b), base, atol=1e-5, rtol=1e-5)

    model.train()
    params = ll.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    tb = batch(3, device)
    losses = []
    for _ in range(4):
        loss = lm_loss(model, tb)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0], losses
    # every adapter tensor got a gradient: the backward passes through the quantized layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    model.eval()

    expected = out(model, b)
    path = ll.save(model, tmp_path / "q.safetensors")
    meta = ll.read_metadata(path)
    assert {t["quantization"] for t in meta["targets"].values()} == {kind}
    fresh = qmodel(kind, device)
    ll.load(fresh, path)
    torch.testing.assert_close(out(fresh, b), expected, atol=1e-5, rtol=1e-5)
    snap_w = {k: v for k, v in fresh.state_dict().items() if "lora_" not in k}
    ll.detach(fresh)
    after = fresh.state_dict()
    assert after.keys() == snap_w.keys() and all(torch.equal(after[k], snap_w[k]) for k in after)
    torch.testing.assert_close(out(fresh, b), base, atol=0, rtol=0)


@pytest.mark.parametrize("name", FROZEN)
def test_crop_on_a_quantized_target_is_refused_naming_the_layer(name, device):
    model = qmodel("nf4", device)
    snap = snapshot(model)
    msg = (
        rf"{name}: model\.layers\.0\.self_attn\.q_proj is quantized \(nf4\); residual crop would rewrite "
        rf"its weight\. Use residual='subtract' \(ll\.from_spec\('{name}', residual='subtract'\)\)"
    )
    with pytest.raises(ll.AttachError, match=msg):
        ll.attach(model, small_cfg(name), calibration_data=calibration(), progress=False)
    assert_unchanged(model, snap)


def test_crop_checkpoint_loads_onto_a_quantized_base_with_subtract(tmp_path, device):
    float_model = tiny_lm(seed=0, d=64, d_ff=128).to(device).eval()
    b = batch(7, device)
    float_base = out(float_model, b)
    ll.attach(float_model, small_cfg("pissa"))  # crop, on the float base
    perturb(float_model)
    delta_float = out(float_model, b) - float_base
    path = ll.save(float_model, tmp_path / "crop.safetensors")

    model = qmodel("nf4", device)
    snap = snapshot(model)
    with pytest.raises(
        ll.AttachError, match=r"q_proj is quantized \(nf4\).*ll\.load\(model, path, residual='subtract'\)"
    ):
        ll.load(model, path)
    assert_unchanged(model, snap)
    base = out(model, b)
    ll.load(model, path, residual="subtract")
    info = ll.state(model).targets["model.layers.0.self_attn.q_proj"].info
    assert info["quantization"] == "nf4" and info["loaded_from_quantization"] is None
    assert ll.state(model).cfg.residual == "subtract"
    # the adapter moves the quantized model's logits as it moved the float model's
    delta_quant = out(model, b) - base
    assert float((delta_quant - delta_float).norm() / delta_float.norm()) < 0.2
    meta = ll.read_metadata(ll.save(model, tmp_path / "sub.safetensors"))
    assert meta["config"]["residual"] == "subtract"
    assert meta["targets"]["model.layers.0.self_attn.q_proj"]["loaded_from_quantization"] is None


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dora_trained_on_a_quantized_base_loads_onto_the_float_one(kind, tmp_path, device):
    model = qmodel(kind, device)
    ll.attach(model, small_cfg("dora"))
    perturb(model)
    path = ll.save(model, tmp_path / "d.safetensors")
    float_model = tiny_lm(seed=0, d=64, d_ff=128).to(device).eval()
    ll.load(float_model, path)  # DoRA's math reads W: the quantized-tolerance fingerprint check passes
    info = ll.state(float_model).targets["model.layers.1.self_attn.v_proj"].info
    assert info["quantization"] is None and info["loaded_from_quantization"] == kind
    assert info["loaded_fingerprint_distance"] < 0.4
    other = qmodel(kind, device, seed=5)  # same shapes, other weights
    snap = snapshot(other)
    with pytest.raises(ll.CheckpointError, match=r"base weight differs .*refusing"):
        ll.load(other, path)
    assert_unchanged(other, snap)


def test_a_spec_without_quantized_base_is_refused_on_quantized_targets(tmp_path, monkeypatch, device):
    from pathlib import Path

    monkeypatch.setenv("LORA_LITE_CACHE", str(tmp_path / "cache"))
    text = (Path(__file__).resolve().parents[1] / "specs" / "lora.yaml").read_text()
    text = text.replace("name: lora", "name: fp_lora").replace("quantized_base: true", "quantized_base: false")
    (tmp_path / "fp_lora.yaml").write_text(text)
    cfg = ll.from_spec(tmp_path / "fp_lora.yaml")
    assert cfg.variant().QUANTIZED_BASE is False
    model = qmodel("int8", device)
    snap = snapshot(model)
    with pytest.raises(
        ll.AttachError,
        match=r"fp_lora: model\.layers\.0\.self_attn\.q_proj is quantized \(int8\).*quantized_base: false",
    ):
        ll.attach(model, cfg)
    assert_unchanged(model, snap)


# Reading a quantized W -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_base_weight_and_base_forward_match_the_layers_own_forward(kind, device):
    lin = nn.Linear(64, 96, bias=True)
    layer = quantize(nn.ModuleDict({"l": lin}), kind, device=device)["l"].train()
    x = torch.randn(5, 64, device=device)
    W = rt.base_weight(layer)
    assert W.shape == (96, 64) and W.dtype == torch.float32
    w0 = lin.weight.detach().to(device)
    rel = float((W - w0).norm() / w0.norm())
    assert rel < {"int8": 0.02, "nf4": 0.12, "fp4": 0.15}[kind]
    tol = 1e-5 if device == "cpu" else 2e-2  # CUDA int8 also quantizes the activations
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, x @ W.T + layer.bias, atol=tol * y.abs().max().item(), rtol=0)
    if kind == "int8":  # after the first forward bitsandbytes moves SCB from the weight to layer.state
        assert layer.weight.SCB is None and layer.state.SCB is not None
        torch.testing.assert_close(rt.base_weight(layer), W, atol=0, rtol=0)
    layer.register_forward_hook(lambda *a: pytest.fail("base_forward must not run the module's hooks"))
    torch.testing.assert_close(rt.base_forward(layer, x), x @ W.T, atol=tol * y.abs().max().item(), rtol=0)


def test_base_row_sqnorm_is_cached_once_per_quantized_weight(device):
    layers = quantize(nn.ModuleDict({"a": nn.Linear(64, 64), "b": nn.Linear(64, 64)}), "nf4", device=device)
    a = layers["a"]
    first = rt.base_row_sqnorm(a)
    torch.testing.assert_close(first, rt.base_weight(a).square().sum(1))
    assert rt.base_row_sqnorm(a) is first  # cached: no second dequantization
    key, cached = a.__dict__[rt.SQNORM_ATTR]
    assert cached.shape == (64,)  # only the (o,) statistic is kept, no dequantized W
    a.weight = layers["b"].weight  # another weight: the cache is stale and recomputed
    torch.testing.assert_close(rt.base_row_sqnorm(a), rt.base_weight(layers["b"]).square().sum(1))
    # float weights: tests/test_dora_delora_hra_eva.py


def test_quantized_row_norm_cache_sees_counted_writes_and_refresh_clears_the_rest(device):
    layers = quantize(nn.ModuleDict({"a": nn.Linear(64, 64), "b": nn.Linear(64, 64)}), "nf4", device=device)
    a, other = layers["a"], layers["b"].weight.data

    def fresh():
        return rt.base_weight(a).square().sum(1)

    rt.base_row_sqnorm(a)
    with torch.no_grad():
        a.weight.copy_(other.flip(0))  # in place, counted by autograd: seen
    torch.testing.assert_close(rt.base_row_sqnorm(a), fresh())
    a.weight.data = other.clone()  # new storage: seen
    torch.testing.assert_close(rt.base_row_sqnorm(a), fresh())
    stale = rt.base_row_sqnorm(a).clone()
    a.weight.data.copy_(other.flip(0))  # in place through .data: not counted, the cache is stale
    assert torch.equal(rt.base_row_sqnorm(a), stale) and not torch.equal(stale, fresh())
    assert rt.refresh_row_norms(layers) == 1  # the documented fix
    torch.testing.assert_close(rt.base_row_sqnorm(a), fresh())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dora_norm_on_a_quantized_base_equals_the_dense_formula(kind, device):
    model = qmodel(kind, device).train()  # train mode: the CPU forward is exact in fp32
    ll.attach(model, small_cfg("dora"))
    perturb(model, scale=0.3)
    t = ll.state(model).targets["model.layers.0.self_attn.v_proj"]
    m, s = t.module, t.cfg.alpha / t.cfg.r
    x = torch.randn(3, 64, device=device)
    with torch.no_grad():
        got = m(x)
        W = rt.base_weight(m)
        V = W + s * (m.lora_B @ m.lora_A)  # (o, i) the dense form the forward avoids
        want = m.lora_magnitude_vector / V.norm(dim=1) * (x @ W.T + s * (x @ m.lora_A.T) @ m.lora_B.T)
    tol = 1e-5 if device == "cpu" else 2e-2
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=0)
    assert rt.SQNORM_ATTR in m.__dict__
    ll.detach(model)
    assert rt.SQNORM_ATTR not in m.__dict__


def test_cpu_repacked_4bit_layers_dequantize_and_warn():
    from bitsandbytes.functional import dequantize_blockwise
    from bitsandbytes.nn.modules import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
    model = qmodel("nf4", "cpu")
    layer = model.model.layers[0].self_attn.q_proj
    qs = layer.weight.quant_state
    W = rt.base_weight(layer)
    absmax = dequantize_blockwise(qs.absmax, qs.state2) + qs.offset  # (blocks,) fp32
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        model(**token_batch())  # eval mode, no grad: bitsandbytes repacks every 4-bit layer
    assert layer.weight.quant_state.packing_format_for_cpu
    # the packed layer's weight: the same codes, absmax rounded to bf16
    want = (W.reshape(-1, 64) / absmax[:, None] * absmax.bfloat16().float()[:, None]).reshape(W.shape)
    torch.testing.assert_close(rt.base_weight(layer), want, atol=1e-6, rtol=0)
    with pytest.warns(UserWarning, match="repacked for CPU inference"):
        ll.attach(model, small_cfg("lora"))
