"""The AntiPaSTO family (antipasto, antipasto_corda, antipasto_ablate, antipasto_arrow) and the
composite corda_arrow: the runtime properties their upstream bugs broke, and each core's math.

1. calibration statistics come from the intact model (not one with earlier targets cropped)
2. detach restores W; a detached model equals a never-attached one (fp32 and bf16)
3. load needs no calibration data and rebuilds W_res; a checkpoint refuses another base
4. calibration input forms, padding excluded, and the errors for bad data (model untouched)
5. SVD in fp32 whatever the model dtype; identity at init in bf16 too
plus set_coeff, Wanda re-selection, CorDA's projector, ablate's contraction, arrow's block bound
and the trainable counts on a Qwen3-0.6B shape (from shapes(), no SVD).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

import lora_lite as ll
import lora_lite.runtime as rt
from conftest import assert_unchanged, calibration, logits, make_model, perturb, small_cfg, snapshot, token_batch

FAMILY = ["antipasto", "antipasto_corda", "antipasto_ablate", "antipasto_arrow", "corda_arrow"]
CALIBRATED = ["antipasto", "antipasto_corda", "antipasto_arrow", "corda_arrow"]  # read the statistics
CORDA = ["antipasto_corda", "corda_arrow"]  # calibration required


def reference_stats(model, names, batches) -> dict[str, dict]:
    """Input second moments from our own hooks on `model` (padding excluded): the oracle."""
    modules = dict(model.named_modules())
    sums = {n: 0.0 for n in names}
    counts = {n: 0 for n in names}
    mask = [None]

    def hook(name):
        def f(m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()  # (n, i)
            if mask[0] is not None:
                x = x[mask[0].reshape(-1).bool()]
            sums[name] = sums[name] + x.T @ x
            counts[name] += x.shape[0]

        return f

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for b in batches:
            mask[0] = b.get("attention_mask")
            model(**b)
    for h in handles:
        h.remove()
    return {n: {"second_moment": (sums[n] / counts[n]).float(), "tokens": counts[n]} for n in names}


def spy_build(monkeypatch) -> dict:
    """Record the statistics each target's init receives during attach: {name: stats}."""
    seen = {}
    real = rt._build

    def build(gen, name, m, cfg_t, stats):
        seen[name] = stats
        return real(gen, name, m, cfg_t, stats)

    monkeypatch.setattr(rt, "_build", build)
    return seen


# 1. Calibration sees the real model --------------------------------------------------------


@pytest.mark.parametrize("name", CALIBRATED)
def test_statistics_are_gathered_on_the_intact_model(name, monkeypatch):
    model = make_model()
    untouched = copy.deepcopy(model)
    seen = spy_build(monkeypatch)
    batches = calibration()
    attach_cfg = small_cfg(name)
    ll.attach(model, attach_cfg, calibration_data=batches, progress=False)
    st = ll.state(model)
    ref = reference_stats(untouched, list(st.targets), batches)
    assert set(seen) == set(ref) and any(".layers.1." in n for n in ref)
    for n in ref:
        assert seen[n]["tokens"] == ref[n]["tokens"] == 6 * (4 * 16 - 3)
        torch.testing.assert_close(seen[n]["second_moment"], ref[n]["second_moment"], atol=1e-5, rtol=1e-5)
        # and the basis on the layer is the one the untouched statistics give
        t = st.targets[n]
        want = st.variant.init(rt.base_weight(untouched.get_submodule(n)), t.cfg, ref[n])
        for k, v in want.items():
            if not st.variant.PARAMS[k][2]:  # frozen basis buffers
                torch.testing.assert_close(getattr(t.module, k), v, atol=1e-4, rtol=1e-4, msg=f"{n}.{k}")


def test_the_intact_model_check_would_catch_calibrating_after_the_crop():
    # Upstream's bug: crop every target first, calibrate afterwards. Layer 1's inputs then differ.
    model = make_model()
    batches = calibration(n=2)
    cropped = copy.deepcopy(model)
    ll.attach(cropped, small_cfg("antipasto"))
    for t in ll.state(cropped).targets.values():
        t.handle.remove()  # W_res without the hook that adds U S Vh back
    name = "model.layers.1.self_attn.q_proj"
    a = reference_stats(model, [name], batches)[name]["second_moment"]
    b = reference_stats(cropped, [name], batches)[name]["second_moment"]
    assert not torch.allclose(a, b, atol=1e-3, rtol=1e-3)


# 2. Detach gives the base model back ----------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY)
def test_detach_in_bf16_restores_weights_within_rounding_and_outputs(name):
    model = make_model().to(torch.bfloat16)
    never = make_model().to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ll.attach(model, small_cfg(name, dtype=torch.bfloat16), calibration_data=calibration(), progress=False)
    perturb(model)
    ll.detach(model)
    for k, v in model.state_dict().items():  # W = W_res + U S P, rounded once to bf16
        assert (v.float() - before[k].float()).abs().max() <= 2**-8 * before[k].float().abs().max(), k
    torch.testing.assert_close(logits(model), logits(never), atol=3e-2, rtol=3e-2)


# 3. Checkpoints -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY)
def test_load_rebuilds_w_res_without_calibration_and_refuses_another_base(name, tmp_path):
    model = make_model()
    ll.attach(model, small_cfg(name), calibration_data=calibration(), progress=False)
    perturb(model)
    path = ll.save(model, tmp_path / "a.safetensors")
    meta = ll.read_metadata(path)
    for tname, t in meta["targets"].items():
        assert len(t["fingerprint"]) == 9, tname
    fresh = make_model()
    ll.load(fresh, path)  # no calibration_data argument exists on load
    sd, sd_fresh = model.state_dict(), fresh.state_dict()
    for k in sd:  # the same W_res, frozen basis and trained tensors
        torch.testing.assert_close(sd_fresh[k], sd[k], atol=1e-6, rtol=1e-6, msg=k)
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-5, rtol=1e-5)
    ll.save(fresh, tmp_path / "b.safetensors")
    ll.detach(fresh)
    again = make_model()
    ll.load(again, tmp_path / "b.safetensors")
    a, b = load_file(path), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(logits(again), logits(model), atol=1e-5, rtol=1e-5)
    other = make_model(seed=5)  # same shapes, other weights: the crop depends on W
    snap = snapshot(other)
    with pytest.raises(ll.CheckpointError, match=r"model.layers.0.self_attn.q_proj: base weight differs .*refusing"):
        ll.load(other, path)
    assert_unchanged(other, snap)


# 4. Calibration input forms and errors --------------------------------------------------------


def _frozen(model) -> dict[str, torch.Tensor]:
    return {
        k: v.clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[1] in ("lora_U", "lora_S", "lora_P")
    }


@pytest.mark.parametrize("name", ["antipasto_corda", "antipasto"])
def test_calibration_accepts_dicts_tuples_tensors_and_generators(name):
    ids = [token_batch(seed=100 + i, batch=4, seq=16)["input_ids"] for i in range(3)]  # no padding
    forms = {
        "dicts": [{"input_ids": x} for x in ids],
        "tuples": [(x,) for x in ids],
        "tensors": list(ids),
        "generator": (x for x in ids),
    }
    got = {}
    for form, data in forms.items():
        model = make_model()
        ll.attach(model, small_cfg(name), calibration_data=data, progress=False)
        got[form] = _frozen(model)
    for form in forms:
        assert got[form].keys() == got["dicts"].keys()
        for k in got["dicts"]:
            torch.testing.assert_close(got[form][k], got["dicts"][k], msg=f"{form}: {k}")


def test_padding_is_excluded_from_the_statistics(monkeypatch):
    seen = spy_build(monkeypatch)
    batch = token_batch(seed=3, batch=4, seq=16, pad=5)
    trimmed = [{"input_ids": batch["input_ids"][0:1, 5:]}, {"input_ids": batch["input_ids"][1:]}]
    model = make_model()
    ll.attach(model, small_cfg("antipasto_corda"), calibration_data=[batch], progress=False)
    padded = dict(seen)
    other = make_model()
    ll.attach(other, small_cfg("antipasto_corda"), calibration_data=trimmed, progress=False)
    for n, s in padded.items():  # left padding + a causal mask: the real tokens see the same thing
        assert s["tokens"] == seen[n]["tokens"] == 4 * 16 - 5
        torch.testing.assert_close(s["second_moment"], seen[n]["second_moment"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name, data, error, match",
    [
        ("antipasto_corda", None, ll.AttachError, r"antipasto_corda needs calibration_data"),
        ("corda_arrow", [], ll.AttachError, r"calibration_data is empty"),
        (
            "antipasto_corda",
            [token_batch(seed=1, batch=1, seq=8)],
            ll.AttachError,
            r"antipasto_corda: model.layers.0.self_attn.q_proj: CorDA needs at least d_in=32 calibration tokens, got 8",
        ),
        (
            "antipasto",
            [token_batch(seed=1, batch=1, seq=6, pad=3)],
            ll.AttachError,
            r"antipasto: model.layers.0.self_attn.q_proj: Wanda selection needs at least r=4 calibration tokens, got 3",
        ),
        ("antipasto_arrow", [{"bad": "batch"}], ll.AttachError, r"calibration: batch 0: no tensors in \['bad'\]"),
        (
            "antipasto_arrow",
            [{"input_ids": torch.zeros(1, 4, dtype=torch.long), "bad": torch.ones(1)}],
            ll.AttachError,
            r"calibration: batch 0: the model raised TypeError: .*unexpected keyword argument 'bad'",
        ),
    ],
)
def test_bad_calibration_is_a_clear_error_and_leaves_the_model_untouched(name, data, error, match):
    model = make_model()
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        ll.attach(model, small_cfg(name), calibration_data=data, progress=False)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("name", ["antipasto_corda", "antipasto_arrow"])
def test_non_finite_activations_are_refused(name):
    model = make_model()
    bad = token_batch(seed=2)
    with torch.no_grad():
        model.model.embed_tokens.weight[bad["input_ids"][0, 0]] = float("inf")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="non-finite activations at the input of model.layers.0.self_attn.q_proj"):
        ll.attach(model, small_cfg(name), calibration_data=[bad], progress=False)
    assert_unchanged(model, snap)


# 5. fp32 SVD, bf16 identity -------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY)
def test_decompositions_run_in_fp32_and_bf16_model_is_identity_at_init(name, monkeypatch):
    dtypes = []
    for fn in ("svd", "eigh"):
        real = getattr(torch.linalg, fn)

        def spy(a, *args, _real=real, **kw):
            dtypes.append(a.dtype)
            return _real(a, *args, **kw)

        monkeypatch.setattr(torch.linalg, fn, spy)
    model = make_model().to(torch.bfloat16)
    base = logits(model)
    cfg = small_cfg(name, dtype=torch.bfloat16)
    ll.attach(model, cfg, calibration_data=calibration(), progress=False)
    assert dtypes and all(d == torch.float32 for d in dtypes)
    assert all(b.dtype == torch.bfloat16 for b in model.buffers() if b.dim() > 0)
    if name == "antipasto_ablate":
        ll.set_coeff(model, 0.0)  # its only exact identity
    # the residual is formed against the stored bf16 buffers: W_res + U S P rounds back to W
    st = ll.state(model)
    ref = make_model().to(torch.bfloat16)
    for n, t in st.targets.items():
        W = ref.get_submodule(n).weight.float()
        W_eff = t.module.weight.float() + st.variant.frozen_weight(t.module, t.cfg)
        assert (W_eff - W).abs().max() <= 2**-8 * W.abs().max(), n
    torch.testing.assert_close(logits(model), base, atol=3e-2, rtol=3e-2)


# set_coeff ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY)
def test_set_coeff_zero_is_identity_and_the_value_is_saved(name, tmp_path):
    model = make_model()
    base = logits(model)
    ll.attach(model, small_cfg(name), calibration_data=calibration(), progress=False)
    perturb(model, scale=0.5)
    trained = logits(model)
    assert not torch.allclose(trained, base, atol=1e-3)
    ll.set_coeff(model, 0.0)
    torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=1e-5)
    ll.set_coeff(model, 0.5)
    half = logits(model)
    path = ll.save(model, tmp_path / "a.safetensors")
    meta = ll.read_metadata(path)
    assert meta["config"]["coeff"] == 0.5
    assert all(t["hyperparameters"]["coeff"] == 0.5 for t in meta["targets"].values())
    fresh = make_model()
    ll.load(fresh, path)
    assert ll.state(fresh).cfg.coeff == 0.5
    torch.testing.assert_close(logits(fresh), half, atol=1e-5, rtol=1e-5)
    ll.set_coeff(fresh, 1.0)
    torch.testing.assert_close(logits(fresh), trained, atol=1e-5, rtol=1e-5)


def test_set_coeff_on_a_spec_without_coeff_is_an_error():
    model = make_model()
    with pytest.raises(ll.AttachError, match="no lora-lite adapter is attached"):
        ll.set_coeff(model, 0.0)
    ll.attach(model, ll.LoRAConfig(r=2))
    with pytest.raises(ll.AttachError, match=r"set_coeff: lora has no runtime 'coeff' knob"):
        ll.set_coeff(model, 0.0)


# Wanda re-selection ---------------------------------------------------------------------------


def _known_svd(d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    S = torch.arange(d, 0, -1).float()  # 8, 7, ..., 1
    return U, S, V.T, (U * S) @ V.T


@pytest.mark.parametrize("name", ["antipasto", "antipasto_arrow"])
def test_wanda_selects_by_score_not_by_singular_value(name):
    U, S, Vh, W = _known_svd()
    # inputs with almost all their energy along the weakest direction Vh[7] (S = 1)
    energy = torch.ones(8)
    energy[7] = 100.0**2
    C = (Vh.T * energy) @ Vh  # (i, i); Vh_k C Vh_k^T = energy_k
    gen = ll.variant_module(name)
    cfg = gen.Config(r=4, **({"block": 2} if name == "antipasto_arrow" else {}))
    plain = gen.init(W, cfg, None)
    torch.testing.assert_close(plain["lora_S"], S[:4])  # no data: the top-r by S
    picked = gen.init(W, cfg, {"second_moment": C, "tokens": 100})
    # scores S_k * sqrt(energy_k): 8, 7, 6, 5, 4, 3, 2, 100 -> directions 7, 0, 1, 2, kept in S order
    torch.testing.assert_close(picked["lora_S"], torch.tensor([8.0, 7.0, 6.0, 1.0]))
    for row, k in enumerate([0, 1, 2, 7]):
        assert abs(float(picked["lora_Vh"][row] @ Vh[k])) == pytest.approx(1.0, abs=1e-5)
    W_top = (picked["lora_U"] * picked["lora_S"]) @ picked["lora_Vh"]
    torch.testing.assert_close(W_top @ Vh[7], U[:, 7] * 1.0, atol=1e-5, rtol=1e-5)  # the weak one is kept
    with pytest.raises(ValueError, match="Wanda selection needs at least r=4 calibration tokens, got 3"):
        gen.init(W, cfg, {"second_moment": C, "tokens": 3})


# CorDA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CORDA)
def test_corda_projector_whitens_to_orthonormal_rows_and_reconstructs_w(name, monkeypatch):
    seen = spy_build(monkeypatch)
    model = make_model()
    W0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    cfg = small_cfg(name)
    ll.attach(model, cfg, calibration_data=calibration(), progress=False)
    st = ll.state(model)
    for n, t in st.targets.items():
        lam, Q = torch.linalg.eigh(seen[n]["second_moment"].double())
        C_half = (Q * (lam.clamp_min(0) + cfg.cov_eps).sqrt()) @ Q.T  # damped C^1/2
        PC = t.module.lora_P.double() @ C_half  # (r, i)
        torch.testing.assert_close(PC @ PC.T, torch.eye(t.cfg.r, dtype=torch.float64), atol=1e-4, rtol=0)
        U = t.module.lora_U.double()
        torch.testing.assert_close(U.T @ U, torch.eye(t.cfg.r, dtype=torch.float64), atol=1e-5, rtol=0)
        S = t.module.lora_S
        assert bool((S[:-1] >= S[1:]).all()), "singular values in decreasing order"
        W = t.module.weight + st.variant.frozen_weight(t.module, t.cfg)  # W_res + U diag(S) P
        torch.testing.assert_close(W, W0[n], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(PC.float() @ torch.linalg.inv(C_half).float(), PC.float(), atol=1e-2)  # oblique


# ablate ---------------------------------------------------------------------------------------


def test_ablate_is_contractive_for_coeff_in_0_1():
    model = make_model()
    ll.attach(model, small_cfg("antipasto_ablate", k=2), progress=False)
    perturb(model, scale=2.0)  # strengths far from 0.05, directions far from init
    st = ll.state(model)
    t = st.targets["model.layers.0.self_attn.q_proj"]
    m = t.module
    x = torch.randn(64, m.in_features, generator=torch.Generator().manual_seed(0))
    h = (x @ m.lora_Vh.T) * m.lora_S  # (n, r), the S-scaled coordinates before the core
    y0 = torch.zeros(64, m.out_features)
    for coeff in (0.0, 0.25, 0.5, 1.0):
        cfg = t.cfg.__class__(**{**t.cfg.hyperparameters(), "coeff": coeff})
        out = st.variant.forward(m, x, y0, cfg)  # h_new U^T; U has orthonormal columns
        assert bool((out.norm(dim=1) <= h.norm(dim=1) * (1 + 1e-5) + 1e-6).all()), coeff
        if coeff == 0.0:
            torch.testing.assert_close(out, h @ m.lora_U.T)
    # the core's eigenvalues: 1 - coeff * strength along span(c), 1 elsewhere
    Chat, _ = torch.linalg.qr(m.lora_c.detach())
    K = torch.eye(Chat.shape[0]) - (Chat * torch.sigmoid(m.lora_strength_logit.detach())) @ Chat.T
    ev = torch.linalg.eigvalsh(K)
    assert float(ev.min()) >= -1e-6 and float(ev.max()) <= 1 + 1e-6
    grow = st.variant.forward(m, x, y0, t.cfg.__class__(**{**t.cfg.hyperparameters(), "coeff": -1.0}))
    assert bool((grow.norm(dim=1) > h.norm(dim=1) * (1 + 1e-4)).any())  # coeff < 0 adds back: not contractive


def test_ablate_one_direction_is_normalised_as_its_qr_would_be():
    model = make_model()
    ll.attach(model, small_cfg("antipasto_ablate", k=1), progress=False)
    perturb(model, scale=2.0)
    st = ll.state(model)
    t = st.targets["model.layers.0.self_attn.q_proj"]
    m = t.module
    x = torch.randn(16, m.in_features, generator=torch.Generator().manual_seed(0))
    y0 = torch.zeros(16, m.out_features)
    for flip in (False, True):  # either sign of c (QR's R may come out negative)
        if flip:
            with torch.no_grad():
                m.lora_c.neg_()
        got = st.variant.forward(m, x, y0, t.cfg)  # crop, coeff = 1: h U^T
        Chat, _ = torch.linalg.qr(m.lora_c)  # (r, 1)
        h0 = (x @ m.lora_Vh.T) * m.lora_S
        want = (h0 - ((h0 @ Chat) * torch.sigmoid(m.lora_strength_logit)) @ Chat.T) @ m.lora_U.T
        torch.testing.assert_close(got, want)
        g_got, g_want = (torch.autograd.grad(out.square().sum(), m.lora_c)[0] for out in (got, want))
        torch.testing.assert_close(g_got, g_want)


def test_ablate_k_above_r_is_refused():
    model = make_model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"ablate needs k <= r directions, got k=5, r=4"):
        ll.attach(model, small_cfg("antipasto_ablate", k=5))
    assert_unchanged(model, snap)


# arrow ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["antipasto_arrow", "corda_arrow"])
def test_arrow_block_must_be_below_r(name):
    model = make_model()
    snap = snapshot(model)
    with pytest.raises(
        ValueError, match=rf"{name}: model.layers.0.self_attn.q_proj: arrow needs 1 <= block < r, got block=4, r=4"
    ):
        ll.attach(model, small_cfg(name, block=4), calibration_data=calibration(), progress=False)
    assert_unchanged(model, snap)
    # r is clamped per layer (v_proj is 32 -> 16): the error names the layer where block >= r
    with pytest.warns(UserWarning, match="r=24 exceeds"), pytest.raises(ValueError, match=r"v_proj: arrow needs"):
        ll.attach(model, small_cfg(name, r=24, block=16), calibration_data=calibration(n=8), progress=False)
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match=r"block=0 is below its minimum 1"):
        small_cfg(name, block=0)


def test_arrow_block_mixes_only_the_top_b_directions():
    model = make_model()
    ll.attach(model, small_cfg("antipasto_arrow"), progress=False)  # r=4, block=2
    st = ll.state(model)
    t = st.targets["model.layers.0.self_attn.q_proj"]
    m = t.module
    with torch.no_grad():
        m.lora_M.copy_(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))  # direction 1 drives direction 0
        m.lora_g.fill_(-100.0)  # tail gain 1 + ELU(-100) ~ 0
    x = m.lora_Vh[1:2] * 3.0  # input along direction 1 only: h = (0, 3 S_1, 0, 0)
    out = st.variant.forward(m, x, torch.zeros(1, m.out_features), t.cfg)
    coords = out @ m.lora_U  # (1, r) back in S-space
    S1 = float(m.lora_S[1])
    torch.testing.assert_close(coords, torch.tensor([[3 * S1, 3 * S1, 0.0, 0.0]]), atol=1e-4, rtol=1e-4)


# Trainable counts on Qwen3-0.6B (upstream's table), from the spec's shapes: no SVD needed -----

QWEN3_06B = {"q_proj": (1024, 2048), "v_proj": (1024, 1024)}  # (d_in, d_out); 28 layers
UPSTREAM_COUNTS = {
    "antipasto": 14_336,
    "antipasto_corda": 14_336,
    "antipasto_ablate": 14_392,
    "antipasto_arrow": 17_472,
}


@pytest.mark.parametrize("name", sorted(UPSTREAM_COUNTS))
def test_trainable_counts_match_upstream_on_qwen3_shapes(name):
    gen = ll.variant_module(name)
    cfg = gen.Config(r=256)
    per_layer = 0
    for d_in, d_out in QWEN3_06B.values():
        shapes = gen.shapes(cfg, d_in, d_out)
        per_layer += sum(math.prod(shapes[k]) for k, (_, _, trainable) in gen.PARAMS.items() if trainable)
    assert 28 * per_layer == UPSTREAM_COUNTS[name]


# Spec checks for the family --------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, old, new, message",
    [
        (
            "antipasto",
            "residual: crop",
            "residual: none",
            "$.residual: basis 'svd' puts part of W into the 'gain' core; residual none would count it twice",
        ),
        ("antipasto_corda", "lora_P:", "lora_Vh:", "$.params: core 'gain' on basis 'corda' needs tensor 'lora_P'"),
        (
            "antipasto_corda",
            "  cov_eps:",
            "  cov_epsilon:",
            "$.hyperparameters: the composition needs hyperparameter 'cov_eps' (float) (rule missing-hyper)",
        ),
        ("antipasto_arrow", "  block:", "  blk:", "$.hyperparameters: the composition needs hyperparameter 'block'"),
        ("antipasto_corda", "source: corda}", "source: corda, select: wanda}", "basis 'corda' selects one of"),
        ("antipasto", "source: svd, select: wanda}", "source: pca}", "core 'gain' needs a basis in ['corda', 'svd']"),
    ],
)
def test_family_spec_mistakes_are_named(spec, old, new, message):
    from lora_lite.codegen import SpecError
    from lora_lite.codegen.spec import parse_spec, shipped_specs_dir

    text = (shipped_specs_dir() / f"{spec}.yaml").read_text()
    assert old in text
    with pytest.raises(SpecError) as e:
        parse_spec(text.replace(old, new, 1), where=f"{spec}.yaml", stem=spec)
    assert any(message in p for p in e.value.problems), e.value.problems


def test_typed_configs():
    assert ll.AntiPaSTOConfig(r=8) == ll.from_spec("antipasto", r=8)
    assert type(ll.from_spec("antipasto_corda")) is ll.AntiPaSTOCorDAConfig
    assert ll.AntiPaSTOAblateConfig().k == 1 and ll.AntiPaSTOArrowConfig().block == 8
    assert ll.CorDAArrowConfig().cov_eps == 1e-3 and ll.AntiPaSTOConfig().r == 256
