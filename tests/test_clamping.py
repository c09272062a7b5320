"""Rank clamping keeps PEFT's scaling (alpha over the configured r) and uses the dimension the core needs."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lora_lite as ll
from conftest import make_model, perturb
from lora_lite.checkpoint import digest
from lora_lite.codegen.spec import shipped_specs_dir

V = "model.layers.0.self_attn.v_proj"  # 32 -> 16
Q = "model.layers.0.self_attn.q_proj"  # 32 -> 32


def update(model, name: str, x: torch.Tensor) -> torch.Tensor:
    """The adapter's change to one layer's output: hooked output minus the base layer's."""
    m = model.get_submodule(name)
    with torch.no_grad():
        return m(x) - torch.nn.functional.linear(x, m.weight, m.bias)


@pytest.mark.parametrize("name", ["lora", "dora", "pissa"])
def test_clamped_rank_keeps_alpha_over_the_configured_r(name):
    model = make_model()
    with pytest.warns(UserWarning, match=rf"{V}: r=24 exceeds min\(d_in, d_out\)=16; using r=16 and alpha="):
        ll.attach(model, ll.from_spec(name, r=24, alpha=16, residual="subtract" if name == "pissa" else None))
    t, q = ll.state(model).targets[V].cfg, ll.state(model).targets[Q].cfg
    assert (t.r, q.r) == (16, 24)
    assert t.alpha / t.r == pytest.approx(16 / 24) and q.alpha == 16


def test_clamped_lora_update_is_scaled_by_alpha_over_configured_r():
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ll.attach(model, ll.from_spec("lora", r=24, alpha=16))
    perturb(model)
    m = model.get_submodule(V)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    want = (16 / 24) * x @ m.lora_A.T @ m.lora_B.T  # PEFT: alpha / r with r as configured
    assert (update(model, V, x) - want).abs().max() < 1e-5


def test_hra_clamps_to_d_in_only():
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # r=24 <= d_in=32 on every q/v projection: no clamp, no warning
        ll.attach(model, ll.from_spec("hra", r=24))
    assert ll.state(model).targets[V].module.lora_hra_u.shape == (32, 24)
    ll.detach(model)
    with pytest.warns(UserWarning, match=rf"{V}: r=40 exceeds d_in=32; using r=32 for this layer"):
        ll.attach(model, ll.from_spec("hra", r=40))


def test_a_checkpoint_keeps_the_per_target_scaling_it_was_saved_with(tmp_path):
    """An adapter saved when clamping also changed alpha / r (alpha kept at 16 with r=16) loads
    with that scaling: load reads each target's hyperparameters from the file."""
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ll.attach(model, ll.from_spec("lora", r=24, alpha=16))
    perturb(model)
    path = ll.save(model, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["lora_lite"])
    meta["targets"][V]["hyperparameters"]["alpha"] = 16.0  # the earlier rule: alpha unchanged
    meta["sha256"] = digest(meta, tensors)  # a valid file, as that rule's save wrote it
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"lora_lite": json.dumps(meta)})
    fresh = make_model()
    ll.load(fresh, old)
    m = fresh.get_submodule(V)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    assert (update(fresh, V, x) - (16 / 16) * x @ m.lora_A.T @ m.lora_B.T).abs().max() < 1e-5


def test_clamped_delora_keeps_lambda_over_the_configured_r():
    """DeLoRA's strength is lambda / r: clamping r to 16 scales lambda0 by 16 / 24, so each
    normalised rank-1 term starts at lambda0 / 24 as in PEFT (which never clamps)."""
    model = make_model()
    with pytest.warns(UserWarning, match=rf"{V}: r=24 exceeds min\(d_in, d_out\)=16; using r=16 and lambda0=10,"):
        ll.attach(model, ll.from_spec("delora", r=24, lambda0=15.0))
    t, q = ll.state(model).targets[V].cfg, ll.state(model).targets[Q].cfg
    assert (t.r, t.lambda0, q.r, q.lambda0) == (16, 10.0, 24, 15.0)
    perturb(model)
    m = model.get_submodule(V)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    A, B, w = m.lora_A, m.lora_B, m.lora_w_norm
    g = (15.0 / 24) * (m.lora_lambda / 10.0) / (A.norm(dim=1) * B.norm(dim=0))  # (r,) lambda0 / r as configured
    want = ((x * w) @ A.T * g) @ B.T
    assert (update(model, V, x) - want).abs().max() < 1e-5


def test_a_delora_checkpoint_keeps_the_lambda_it_was_saved_with(tmp_path):
    """An adapter saved under the earlier rule (lambda0 unchanged at a clamped r) loads with the
    strength it was trained with: the learned lambda is a saved tensor, r is the saved per-target r."""
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ll.attach(model, ll.from_spec("delora", r=24, lambda0=15.0))
    perturb(model)
    with torch.no_grad():
        model.get_submodule(V).lora_lambda.fill_(15.0)  # what the earlier rule started from
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    before = update(model, V, x)
    path = ll.save(model, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["lora_lite"])
    meta["targets"][V]["hyperparameters"]["lambda0"] = 15.0  # the earlier rule: lambda0 unchanged
    meta["sha256"] = digest(meta, tensors)
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"lora_lite": json.dumps(meta)})
    fresh = make_model()
    ll.load(fresh, old)
    assert ll.state(fresh).targets[V].cfg.lambda0 == 15.0
    assert torch.equal(update(fresh, V, x), before)
    m = fresh.get_submodule(V)
    g = (15.0 / 16) / (m.lora_A.norm(dim=1) * m.lora_B.norm(dim=0))  # lambda 15 over the saved r = 16
    assert (before - ((x * m.lora_w_norm) @ m.lora_A.T * g) @ m.lora_B.T).abs().max() < 1e-5


def test_clamped_rslora_keeps_alpha_over_sqrt_of_the_configured_r():
    """rsLoRA's scale is alpha / sqrt(r): clamping r from 24 to 16 scales alpha by sqrt(16 / 24),
    so the clamped layer's update is B A x times alpha / sqrt(24), as PEFT's (which never clamps)."""
    model = make_model()
    with pytest.warns(UserWarning, match=rf"{V}: r=24 exceeds .*keeping alpha / r \*\* 0.5 = 3.26599"):
        ll.attach(model, ll.from_spec("rslora", r=24, alpha=16.0))
    t = ll.state(model).targets[V].cfg
    assert t.r == 16 and t.alpha / t.r**0.5 == pytest.approx(16 / 24**0.5)
    perturb(model)
    m, x = model.get_submodule(V), torch.randn(3, 32)
    want = (16 / 24**0.5) * x @ m.lora_A.T @ m.lora_B.T  # (3, 16) the update at PEFT's scale
    assert torch.allclose(update(model, V, x), want, atol=1e-5)


def test_constant_scale_is_not_changed_by_clamping(tmp_path):
    """A spec whose scale is a constant alpha (rule constant) reads no r: clamping leaves alpha."""
    text = (shipped_specs_dir() / "lora.yaml").read_text().replace("name: lora\n", "name: lora_const\n")
    text = text.replace("core: {kind: lowrank}", "core: {kind: lowrank}\nmodifiers: [{kind: scale, rule: constant}]")
    (tmp_path / "lora_const.yaml").write_text(text)
    model = make_model()
    with pytest.warns(UserWarning, match=rf"{V}: r=24 exceeds min\(d_in, d_out\)=16; using r=16 for this layer"):
        ll.attach(model, ll.from_spec(tmp_path / "lora_const.yaml", r=24, alpha=2.0))
    assert ll.state(model).targets[V].cfg.alpha == 2.0


def test_clamp_warning_names_the_line_that_called_attach():
    model = make_model()
    with pytest.warns(UserWarning, match=rf"{V}: r=24 exceeds") as caught:
        ll.attach(model, ll.from_spec("lora", r=24, target_names=[r"\.v_proj$"]))
    assert {w.filename for w in caught if "exceeds" in str(w.message)} == {__file__}
