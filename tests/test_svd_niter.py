"""svd_niter: the randomized SVD (torch.svd_lowrank) an SVD basis may opt into.

PEFT's init_lora_weights="pissa_niter_[k]" calls torch.svd_lowrank(W, q=r, niter=k) on the
global random state, which it also draws from for its own lora_A init right before, so the
same torch.manual_seed ahead of each library gives each other random projections. The parity
test therefore fixes the random state the same way at each svd_lowrank call in both.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora_lite as ll
from conftest import llama, logits, make_model, perturb, token_batch

peft = pytest.importorskip("peft")
SPECS = Path(__file__).resolve().parents[1] / "specs"


def seeded(real, calls: list):
    """svd_lowrank with the random state reset before every call (and the calls counted)."""

    def run(A, q=6, niter=2, M=None):
        calls.append(tuple(A.shape))
        torch.manual_seed(99)
        return real(A, q=q, niter=niter, M=M)

    return run


def test_pissa_svd_niter_gives_peft_pissa_niter_when_each_call_draws_the_same_projections(monkeypatch):
    from peft import LoraConfig
    from peft.tuners.lora import layer as lora_layer

    ours_calls, peft_calls = [], []
    monkeypatch.setattr(torch, "svd_lowrank", seeded(torch.svd_lowrank, ours_calls))
    monkeypatch.setattr(lora_layer, "svd_lowrank", seeded(lora_layer.svd_lowrank, peft_calls))
    base = llama()
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.from_spec("pissa", r=4, alpha=8.0, svd_niter=4))
    exact = copy.deepcopy(base)
    ll.attach(exact, ll.from_spec("pissa", r=4, alpha=8.0))
    pcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa_niter_4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), pcfg).eval()
    targets = ll.state(ours).targets
    assert len(ours_calls) == len(peft_calls) == len(targets)  # one randomized SVD per target in each
    worst_w, worst_ba, moved = 0.0, 0.0, 0.0
    for name, t in targets.items():
        layer = theirs.base_model.model.get_submodule(name)
        m, m_exact = t.module, ll.state(exact).targets[name].module
        W_res = layer.base_layer.weight
        worst_w = max(worst_w, float((m.weight - W_res).abs().max() / W_res.abs().max()))
        ba, ba_peft = m.lora_B @ m.lora_A, layer.lora_B.default.weight @ layer.lora_A.default.weight
        worst_ba = max(worst_ba, float((ba - ba_peft).abs().max() / ba_peft.abs().max()))
        moved = max(moved, float((ba - m_exact.lora_B @ m_exact.lora_A).abs().max() / ba_peft.abs().max()))
    assert worst_w < 1e-5, f"W_res differs from PEFT's by {worst_w:.1e}"
    assert worst_ba < 1e-5, f"B A differs from PEFT's by {worst_ba:.1e}"
    assert moved > 1e-3, "the randomized SVD should give another B A than the exact one on this weight"
    batch = {"input_ids": token_batch(seed=7)["input_ids"]}
    with torch.no_grad():
        for model in (ours, theirs):  # move both adapters the same way off init: B A differ from W's part
            for name in targets:
                m = ll.state(ours).targets[name].module
                layer = theirs.base_model.model.get_submodule(name)
                B = m.lora_B if model is ours else layer.lora_B.default.weight
                B.mul_(1.5)
        a, b = ours(**batch).logits, theirs(**batch).logits
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5


def test_svd_niter_finds_the_top_subspace_of_a_decaying_spectrum():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    W = (U[:, :48] * 0.7 ** torch.arange(48.0)) @ V.T  # (64, 48), singular values 0.7^k
    pissa = ll.variant_module("pissa")
    torch.manual_seed(0)
    fast = pissa.init(W, pissa.Config(r=8, alpha=8.0, svd_niter=4))
    full = pissa.init(W, pissa.Config(r=8, alpha=8.0))
    cos = torch.linalg.svdvals(torch.linalg.qr(fast["lora_A"].T)[0].T @ torch.linalg.qr(full["lora_A"].T)[0])
    assert float(cos.min()) > 0.99, f"principal angle cosines {cos.tolist()}"  # measured: 0.997 (q = r, as PEFT)
    # the rank-r part it crops leaves a residual within 1% of the optimal (Eckart-Young) one;
    # measured ||W - B A||_F / optimal: 1.14, 1.049, 1.0032, 1.00001 at svd_niter 1, 2, 4, 8
    residual = lambda t: torch.linalg.norm(W - t["lora_B"] @ t["lora_A"])  # noqa: E731 (s = 1)
    ratio = residual(fast) / residual(full)
    assert 1.0 < float(ratio) < 1.01, float(ratio)


def test_svd_niter_0_is_the_exact_svd_bit_for_bit():
    a, b = make_model(), make_model()
    ll.attach(a, ll.from_spec("pissa", r=4))
    ll.attach(b, ll.from_spec("pissa", r=4, svd_niter=0))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_save_load_with_svd_niter_needs_no_svd(tmp_path, monkeypatch):
    model = make_model()
    ll.attach(model, ll.from_spec("pissa", r=4, svd_niter=2))
    perturb(model)
    ll.save(model, tmp_path / "a.safetensors")
    assert ll.read_metadata(tmp_path / "a.safetensors")["config"]["svd_niter"] == 2

    def no_svd(*a, **k):
        raise AssertionError("load must rebuild W_res from the saved basis")

    monkeypatch.setattr(torch, "svd_lowrank", no_svd)
    fresh = make_model()
    ll.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(logits(fresh), logits(model))
    ll.save(fresh, tmp_path / "b.safetensors")
    x, y = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)


def spec_with(tmp_path, base: str, old: str, new: str) -> Path:
    text = (SPECS / f"{base}.yaml").read_text()
    assert old in text
    path = tmp_path / f"{base}.yaml"
    path.write_text(text.replace(old, new))
    return path


NITER = '  svd_niter: {type: int, default: 4, min: 0, max: 64, doc: "randomized SVD iterations"}\n'


def test_an_svd_spec_opts_in_by_declaring_svd_niter(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "svd_lowrank", seeded(torch.svd_lowrank, calls))
    path = spec_with(tmp_path, "pissa_dora", "target:", NITER + "target:")
    cfg = ll.from_spec(path, r=4)
    assert cfg.svd_niter == 4
    model, ref = make_model(), logits(make_model())
    ll.attach(model, cfg)
    assert len(calls) == len(ll.state(model).targets)  # each target's basis came from svd_lowrank
    assert float((logits(model) - ref).abs().max() / ref.abs().max()) < 1e-5  # identity at init


@pytest.mark.parametrize(
    "base, old, new, message",
    [
        ("milora", "target:", NITER + "target:", "svd_niter needs select top, not 'minor' (rule optional-hyper)"),
        (
            "pissa",
            "svd_niter: {type: int, default: 0, min: 0, max: 64",
            "svd_niter: {type: float, default: 0.0, min: 0.0, max: 64.0",
            "svd_niter is a int (rule hyper-type)",
        ),
        ("lora", "target:", NITER + "target:", "the composition has no use for 'svd_niter' (rule unused-hyper)"),
    ],
)
def test_svd_niter_where_it_cannot_act_is_a_spec_error(tmp_path, base, old, new, message):
    path = spec_with(tmp_path, base, old, new)
    with pytest.raises(ll.SpecError) as e:
        ll.variant_module(path)
    assert message in str(e.value), str(e.value)
