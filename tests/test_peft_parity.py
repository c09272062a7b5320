"""Numerical parity with PEFT, the reference implementation, on a small random Llama in fp32.

For each variant PEFT shares with us: build the adapter with PEFT and with lora-lite on copies of
the same model (attention biases on, so bias handling is compared too), check the frozen state
both derive from W (PiSSA's W_res, DeLoRA's weight norms), move PEFT's trainable tensors to
non-zero values and copy them into ours, then require the same logits and the same gradients
of a fixed loss w.r.t. every adapter tensor: relative max error below 1e-4.
EVA's init is compared as a subspace (PEFT estimates it with an incremental randomized PCA).

Deliberate differences live in KNOWN_DIVERGENCES, one entry per spec with its reason; the
README's "Known divergences from PEFT" section repeats them.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

import lora_lite as ll
from conftest import SPECS, CpuBlockDiag, ScaledEmbedding, llama, smollm2_shaped_layer, token_batch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-4  # relative max error, max|ours - peft| / max|peft|
QV = ["q_proj", "v_proj"]

# Deliberate differences from PEFT, by spec; each must name a shipped spec (and the README says why).
KNOWN_DIVERGENCES: dict[str, str] = {
    "lora": "an nn.Embedding with max_norm is refused (PEFT passes max_norm to F.embedding on A^T, which "
    "renormalises A's columns in place); ll.merge unties an embedding tied to lm_head (lm_head keeps W, "
    "tie_word_embeddings False) where PEFT's merge_and_unload writes the shared weight; the same for rslora and dora. "
    "On a sparse=True embedding A's gradient is dense (PEFT's sparse gradient of A^T cannot be transposed back "
    "to A: its backward fails)",
    "hra": "an odd r is refused (PEFT warns and starts from a random, non-identity transform); "
    "the reflections are applied to x in compact WY form, not as a dense product (same math); "
    "no Gram-Schmidt option (PEFT's apply_GS)",
    "eva": "A is the exact top-r eigenbasis of the pooled input covariance, where PEFT runs an "
    "incremental randomized PCA until its components stop moving (same subspace, compared "
    "as one); uniform rank only (PEFT's rho=1), no rank redistribution",
    "dora": "the norm ||W + s B A||_row is expanded: ||W_i||^2 in fp32 (cached for 4/8-bit W), W A^T in "
    "W's dtype, the rest in fp32, where PEFT forms W + s B A in the input's dtype: identical in fp32. "
    "ll.scale interpolates DoRA's output; PEFT's rescale_adapter_scale scales s inside the norm (equal at 0 and 1)",
    "ia3": "the gain is cast to the layer's dtype and multiplies y there; PEFT multiplies in the "
    "adapter's dtype: identical in fp32",
    "ia3_ff": "the gain is cast to the layer's dtype and multiplies x there; PEFT casts x to the "
    "adapter's dtype and back: identical in fp32",
    "pissa": "singular vectors get canonical signs (largest entry positive), so A and B may differ "
    "from PEFT's by a sign per direction; B A, W_res and every output agree. PEFT's disable_adapter() "
    "and rescale_adapter_scale(0) give W_res's outputs; ll.disabled and ll.scale(0) the base model's",
    "pissa_dora": "as pissa (canonical signs) and dora (the norm expanded, here of W_res + s B A)",
    "loha": "applied as the rank-r^2 product x B12^T A12^T while r^2 (d_in + d_out) < d_in d_out, else "
    "as PEFT's dense update (same math, both compared); no rank_dropout or module_dropout",
    "oft": "a d_in that oft_block_size does not divide is refused, naming the layer (PEFT adjusts the "
    "block size with a warning); no coft, block_share or module_dropout",
    "boft": "the factors are applied to x one at a time, blockwise between permutations, and x R W^T "
    "formed as y - b + (x R - x) W^T, where PEFT multiplies x by the dense (d_in, d_in) product (same "
    "math); factors >= 2 run without PEFT's CUDA extension (compared with PEFT's block-diagonal kernel "
    "done by torch.block_diag); no boft_dropout",
    "corda_lora": "C is PEFT's statistic (each sequence scaled by its signed max) over the non-padding "
    "tokens of each batch row, where PEFT takes batches of one sequence without a padding mask; A and B "
    "carry C's scale, s B A does not; canonical SVD signs; at least d_in calibration tokens are required",
    "corda_dora": "as corda_lora, and dora (the norm of W_res + s B A expanded)",
    "eva_dora": "as eva (the exact pooled PCA; compared on one batch with PEFT's SVD made exact) and "
    "dora (the norm of W + s B A expanded)",
    "lokr": "where r >= max(k, n) / 2 (w2's factor sizes) PEFT holds a full (k, n) w2; here w2 stays "
    "w2_a w2_b at rank r on every layer (other parameter counts there); the update is applied as "
    "vec(s w1 X w2^T), not as the dense kron(w1, w2) (same math); no decompose_both, rank_dropout or module_dropout",
    "vera": "no vera_dropout and no save_projection=False (A and B are always saved, once); each adapter "
    "has its own A and B, where PEFT shares the first adapter's pair among all VeRA adapters",
    "antipasto_corda": "upstream lora-lite's whitened CorDA: SVD of W C^1/2 and P = Vh C^-1/2, where "
    "CorDA's paper and PEFT decompose W C and keep Vh C^-1; damping cov_eps is absolute (no parity test)",
}


def peft_configs() -> dict:
    """spec[:case] -> (PEFT config, our overrides, {our tensor: PEFT tensor path on the layer}, frozen)."""
    from peft import BOFTConfig, DeloraConfig, HRAConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig

    lora = dict(r=4, lora_alpha=8, target_modules=QV, lora_dropout=0.0)
    ab = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight"}
    oft = {"lora_oft_R": "oft_R.default.weight"}
    hada = {f"lora_hada_w{k}_{side}": f"hada_w{k}_{side}.default" for k in (1, 2) for side in "ab"}
    lokr = {f"lora_lokr_{k}": f"lokr_{k}.default" for k in ("w1", "w2_a", "w2_b")}
    return {
        "lora": (LoraConfig(**lora), dict(r=4, alpha=8.0), ab, {}),
        "pissa": (LoraConfig(**lora, init_lora_weights="pissa"), dict(r=4, alpha=8.0), ab, {}),
        "olora": (LoraConfig(**lora, init_lora_weights="olora"), dict(r=4, alpha=8.0), ab, {}),
        "rslora": (LoraConfig(**lora, use_rslora=True), dict(r=4, alpha=8.0), ab, {}),
        "pissa_dora": (
            LoraConfig(**lora, use_dora=True, init_lora_weights="pissa"),
            dict(r=4, alpha=8.0),
            {**ab, "lora_magnitude_vector": "lora_magnitude_vector.default.weight"},
            {},
        ),
        "dora": (
            LoraConfig(**lora, use_dora=True),
            dict(r=4, alpha=8.0),
            {**ab, "lora_magnitude_vector": "lora_magnitude_vector.default.weight"},
            {},
        ),
        "delora": (
            DeloraConfig(r=4, delora_lambda=15, target_modules=QV),
            dict(r=4, lambda0=15.0),
            {"lora_A": "delora_A.default", "lora_B": "delora_B.default", "lora_lambda": "delora_lambda.default"},
            {"lora_w_norm": "delora_w_norm.default"},
        ),
        "ia3": (
            IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[]),
            {},
            {"lora_ia3": "ia3_l.default"},
            {},
        ),
        "ia3_ff": (
            IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]),
            {},
            {"lora_ia3": "ia3_l.default"},
            {},
        ),
        "hra": (HRAConfig(r=4, target_modules=QV), dict(r=4), {"lora_hra_u": "hra_u.default"}, {}),
        # r=2: the rank-r^2 factored form (r^2 (i + o) < i o on every target); r=4: the dense update
        "loha": (LoHaConfig(r=2, alpha=8, target_modules=QV), dict(r=2, alpha=8.0), hada, {}),
        "loha:dense": (LoHaConfig(r=4, alpha=8, target_modules=QV), dict(r=4, alpha=8.0), hada, {}),
        # r=2, 3 < max(k, n) / 2 = 4 on the tiny q and v: PEFT factors w2 too. decompose_factor 2:
        # 32 = 2 x 16, 16 = 2 x 8 (a factor that divides comes first, not the smaller first)
        "lokr": (LoKrConfig(r=2, alpha=8, target_modules=QV), dict(r=2, alpha=8.0), lokr, {}),
        "lokr:r3": (LoKrConfig(r=3, alpha=5, target_modules=QV), dict(r=3, alpha=5.0), lokr, {}),
        "lokr:factor2": (
            LoKrConfig(r=2, alpha=8, decompose_factor=2, target_modules=QV),
            dict(r=2, alpha=8.0, decompose_factor=2),
            lokr,
            {},
        ),
        "boft": (
            BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=QV),
            dict(boft_block_size=4),
            {"lora_boft_R": "boft_R.default", "lora_boft_s": "boft_s.default"},
            {},
        ),
        # OFT: PEFT's default Cayley-Neumann series, and the exact Cayley transform
        "oft": (OFTConfig(oft_block_size=4, target_modules=QV), dict(oft_block_size=4), oft, {}),
        "oft:cayley": (
            OFTConfig(oft_block_size=4, use_cayley_neumann=False, target_modules=QV),
            dict(oft_block_size=4, use_cayley_neumann=False),
            oft,
            {},
        ),
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def peft_tensor(layer: torch.nn.Module, path: str) -> torch.Tensor:
    tensors = dict(layer.named_parameters()) | dict(layer.named_buffers())
    return tensors[path]


def lm_probe_loss(model, batch: dict) -> torch.Tensor:
    """A fixed random linear functional of the logits: every logit gets a gradient."""
    out = model(**batch)
    logits = out.logits if hasattr(out, "logits") else out
    probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))
    return (logits * probe).sum()


def copied_tensors_match_peft(name: str, ours, theirs, layers: dict, mapping: dict, batch: dict, base_logits):
    """Move PEFT's tensors off their init, copy them into ours, and require the same logits and
    gradients (relative error < RTOL); the copied tensors must change the output."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for target, layer in layers.items():
            m = ll.state(ours).targets[target].module
            for ours_k, path in mapping.items():
                t = peft_tensor(layer, path)
                t.add_(0.3 * torch.randn(t.shape, generator=g))
                getattr(m, ours_k).copy_(t.reshape(getattr(m, ours_k).shape))
        want, got = theirs(**batch).logits, ours(**batch).logits
    assert rel_err(want, base_logits) > 1e-2, "the copied tensors should change the output"
    assert rel_err(got, want) < RTOL, f"{name}: logits differ from PEFT by {rel_err(got, want):.2e}"
    lm_probe_loss(theirs, batch).backward()
    lm_probe_loss(ours, batch).backward()
    for target, layer in layers.items():
        m = ll.state(ours).targets[target].module
        for ours_k, path in mapping.items():
            ref = peft_tensor(layer, path).grad
            mine = getattr(m, ours_k).grad
            assert ref is not None and mine is not None, (target, ours_k)
            err = rel_err(mine, ref.reshape(mine.shape))
            assert err < RTOL, f"{name}: {target}.{ours_k} gradient differs from PEFT by {err:.2e}"


def build_pair(name: str):
    """(our model, PEFT model, {target: PEFT layer}, mapping, frozen) on copies of one llama."""
    pcfg, over, mapping, frozen = peft_configs()[name]
    base = llama()
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.from_spec(name.split(":")[0], **over))
    torch.manual_seed(1234)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), pcfg).eval()
    layers = {t: theirs.base_model.model.get_submodule(t) for t in ll.state(ours).targets}
    return ours, theirs, layers, mapping, frozen


@pytest.mark.parametrize("name", sorted(peft_configs()))
def test_same_logits_and_gradients_as_peft(name):
    ours, theirs, layers, mapping, frozen = build_pair(name)
    batch = token_batch(seed=7, vocab=64, pad=0)
    batch = {"input_ids": batch["input_ids"]}
    # identity at init for both
    base_logits = llama()(**batch).logits
    with torch.no_grad():
        assert rel_err(theirs(**batch).logits, base_logits) < RTOL
        assert rel_err(ours(**batch).logits, base_logits) < RTOL
    # frozen state derived from W agrees (PiSSA's residual weight, DeLoRA's input-channel norms)
    for target, layer in layers.items():
        m = ll.state(ours).targets[target].module
        for ours_k, path in frozen.items():
            assert rel_err(getattr(m, ours_k), peft_tensor(layer, path).reshape(-1)) < RTOL, (target, ours_k)
        if name in ("pissa", "olora", "pissa_dora"):  # the cropped W_res
            assert rel_err(m.weight, layer.base_layer.weight) < RTOL, target
    # same non-zero trainable values: move PEFT's off init, copy them into ours
    copied_tensors_match_peft(name, ours, theirs, layers, mapping, batch, base_logits)


@pytest.mark.parametrize("factors", [2, 3])
def test_boft_butterfly_factors_same_logits_and_gradients_as_peft(factors, monkeypatch):
    """PEFT builds factors >= 2 only with its CUDA extension (without it, it falls back to one
    factor). Its extension only assembles block-diagonal matrices: with that one kernel done by
    torch.block_diag, PEFT's own permutations (boft_P) and product run on the CPU."""
    from peft import BOFTConfig
    from peft.tuners.boft import layer as boft_layer

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(boft_layer, "FastBlockDiag", CpuBlockDiag)
    base = llama()
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.from_spec("boft", boft_block_size=4, boft_n_butterfly_factor=factors))
    pcfg = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=factors, target_modules=QV)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), pcfg).eval()
    layers = {t: theirs.base_model.model.get_submodule(t) for t in ll.state(ours).targets}
    for layer in layers.values():
        assert layer.boft_R["default"].shape[0] == factors  # PEFT did not fall back to one factor
    batch = {"input_ids": token_batch(seed=7, vocab=64, pad=0)["input_ids"]}
    mapping = {"lora_boft_R": "boft_R.default", "lora_boft_s": "boft_s.default"}
    copied_tensors_match_peft("boft", ours, theirs, layers, mapping, batch, llama()(**batch).logits)


def eva_setup():
    """A llama whose token embeddings have a decaying spectrum (distinct principal directions),
    and one calibration batch with left padding and label-masked (-100) prompt tokens."""
    base = llama()
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))  # (d, d) random rotation
    with torch.no_grad():
        base.model.embed_tokens.weight.copy_((torch.randn(64, 32, generator=g) * 0.7 ** torch.arange(32.0)) @ Q.T)
    ids = torch.randint(0, 64, (16, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, :4] = 0  # left padding in every third row
    labels = ids.clone()
    labels[:, :3] = -100  # an ignored prompt
    return base, {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("exact_svd", [False, True], ids=["peft_as_shipped", "peft_exact_svd"])
def test_eva_init_subspace_matches_peft_rho_1(exact_svd, monkeypatch):
    """One batch, so PEFT's incremental PCA reduces to one SVD of the same centred tokens.

    As shipped, PEFT's SVD is randomized (torch.svd_lowrank, q = 2r, 4 iterations): measured
    cosines >= 0.997 here, so the bound is 0.99. With that SVD made exact the two agree to 1e-4.
    (Across several batches PEFT's truncated incremental updates drift further from the pooled
    PCA, by up to 20% on nearly tied directions of an unstructured model: measured.)
    """
    from peft import EvaConfig, LoraConfig
    from peft.tuners.lora import eva
    from peft.utils.incremental_pca import IncrementalPCA

    if exact_svd:

        class ExactIPCA(IncrementalPCA):
            def __init__(self, **kw):
                super().__init__(**{**kw, "lowrank": False})

        monkeypatch.setattr(eva, "IncrementalPCA", ExactIPCA)
    bound = 1 - 1e-4 if exact_svd else 0.99

    base, batch = eva_setup()
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.from_spec("eva", r=4), calibration_data=[batch], progress=False)
    pcfg = LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights="eva", eva_config=EvaConfig(rho=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), pcfg)
        eva.initialize_lora_eva_weights(theirs, dataloader=[batch], show_progress_bar=False)
    inputs = {}  # the exact PCA of the counted tokens, as an independent check of ours
    hooks = [
        base.get_submodule(t).register_forward_pre_hook(lambda m, a, t=t: inputs.__setitem__(t, a[0]))
        for t in ll.state(ours).targets
    ]
    with torch.no_grad():
        base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    keep = (batch["attention_mask"].bool() & (batch["labels"] != -100)).reshape(-1)
    for target, st in ll.state(ours).targets.items():
        A = st.module.lora_A.detach()  # (r, i)
        x = inputs[target].reshape(-1, 32)[keep].double()  # (n, i) counted tokens
        _, evecs = torch.linalg.eigh(torch.cov(x.T, correction=0))
        exact = evecs.flip(1)[:, :4].T.float()  # (r, i), largest variance first
        torch.testing.assert_close((A * exact).sum(1).abs(), torch.ones(4), atol=1e-4, rtol=0)
        P = theirs.base_model.model.get_submodule(target).lora_A["default"].weight.detach()  # (r, i)
        P = P / P.norm(dim=1, keepdim=True)
        cosines = torch.linalg.svdvals(A @ P.T)  # principal angles between the row spaces
        assert cosines.min() > bound, f"{target}: EVA subspace differs from PEFT's (cosines {cosines.tolist()})"
        signed = (A * P).sum(1)  # same order and sign convention, direction by direction
        assert signed.min() > bound, f"{target}: directions differ from PEFT's in order or sign: {signed.tolist()}"


def test_eva_dora_same_init_logits_and_gradients_as_peft_eva_with_dora(monkeypatch):
    """One batch with PEFT's SVD made exact: the same A (direction by direction), B = 0 and the same
    magnitude; then PEFT's tensors moved off init and copied into ours: the same logits and gradients."""
    from peft import EvaConfig, LoraConfig
    from peft.tuners.lora import eva
    from peft.utils.incremental_pca import IncrementalPCA

    class ExactIPCA(IncrementalPCA):
        def __init__(self, **kw):
            super().__init__(**{**kw, "lowrank": False})

    monkeypatch.setattr(eva, "IncrementalPCA", ExactIPCA)
    base, batch = eva_setup()
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.from_spec("eva_dora", r=4, alpha=8.0), calibration_data=[batch], progress=False)
    pcfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=QV, init_lora_weights="eva", eva_config=EvaConfig(rho=1.0), use_dora=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), pcfg)
        eva.initialize_lora_eva_weights(theirs, dataloader=[batch], show_progress_bar=False)
    theirs.eval()
    mapping = {
        "lora_A": "lora_A.default.weight",
        "lora_B": "lora_B.default.weight",
        "lora_magnitude_vector": "lora_magnitude_vector.default.weight",
    }
    layers = {t: theirs.base_model.model.get_submodule(t) for t in ll.state(ours).targets}
    for target, layer in layers.items():
        m = ll.state(ours).targets[target].module
        A, P = m.lora_A.detach(), peft_tensor(layer, mapping["lora_A"]).detach()
        signed = (A * P / P.norm(dim=1, keepdim=True)).sum(1)  # (r,) same directions, order and sign
        assert signed.min() > 1 - 1e-4, f"{target}: EVA directions differ from PEFT's: {signed.tolist()}"
        assert not m.lora_B.any() and not peft_tensor(layer, mapping["lora_B"]).any()
        want = peft_tensor(layer, mapping["lora_magnitude_vector"])
        assert rel_err(m.lora_magnitude_vector, want) < RTOL, f"{target}: magnitude differs from PEFT's"
    ids = {"input_ids": batch["input_ids"]}
    with torch.no_grad():
        base_logits = base(**ids).logits
    copied_tensors_match_peft("eva_dora", ours, theirs, layers, mapping, ids, base_logits)


@pytest.mark.parametrize("name", ["corda_lora", "corda_dora"])
def test_corda_same_residual_logits_and_gradients_as_peft_corda_ipm(name):
    """PEFT's CorDA statistic (batches of one sequence, each scaled by its signed max) on a padded
    batch of three sequences of different lengths, fed to PEFT row by row without the padding:
    the same W_res and s B A; then PEFT's tensors moved off init and copied into ours give the
    same logits and gradients."""
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    from lora_lite.bench.twins import one_sequence_each

    base = llama()
    ids = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(0))  # >= d_in tokens
    mask = torch.ones_like(ids)
    mask[1, 25:], mask[2, 12:] = 0, 0  # right padding: 40, 25 and 12 tokens
    calib = [{"input_ids": ids, "attention_mask": mask}]
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.from_spec(name, r=4, alpha=8.0), calibration_data=calib, progress=False)
    pcfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=QV,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method="ipm"),
        use_dora=name == "corda_dora",
    )
    theirs = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preprocess_corda(theirs, pcfg, run_model=lambda: [theirs(**b) for b in one_sequence_each(calib)])
        theirs = peft.get_peft_model(theirs, pcfg).eval()
    mapping = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight"}
    if name == "corda_dora":
        mapping["lora_magnitude_vector"] = "lora_magnitude_vector.default.weight"
    layers = {t: theirs.base_model.model.get_submodule(t) for t in ll.state(ours).targets}
    for target, layer in layers.items():
        m = ll.state(ours).targets[target].module
        assert rel_err(m.weight, layer.base_layer.weight) < RTOL, f"{target}: W_res differs from PEFT's"
        assert rel_err(m.weight, base.get_submodule(target).weight) > 1e-2, f"{target}: W was not cropped"
        if name == "corda_dora":
            mag = peft_tensor(layer, mapping["lora_magnitude_vector"])
            assert rel_err(m.lora_magnitude_vector, mag) < RTOL, f"{target}: magnitude differs from PEFT's"
        BA = m.lora_B @ m.lora_A  # (o, i); A and B themselves carry C's scale, their product does not
        want = peft_tensor(layer, mapping["lora_B"]) @ peft_tensor(layer, mapping["lora_A"])
        assert rel_err(BA, want) < RTOL, f"{target}: s B A differs from PEFT's"
    batch = {"input_ids": token_batch(seed=7, vocab=64)["input_ids"]}
    with torch.no_grad():
        base_logits = base(**batch).logits
    copied_tensors_match_peft(name, ours, theirs, layers, mapping, batch, base_logits)


def test_known_divergences_name_shipped_specs_and_the_readme_explains_them():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Known divergences from PEFT", 1)
    assert len(section) == 2, "README.md needs a '## Known divergences from PEFT' section"
    body = section[1].split("\n## ", 1)[0]
    for name in KNOWN_DIVERGENCES:
        assert name in SPECS, f"KNOWN_DIVERGENCES names {name!r}, which is not a shipped spec"
        assert f"`{name}`" in body, f"README's divergence section does not explain {name!r}"


@pytest.mark.parametrize("variant", [1, 2, 4])
def test_road_same_logits_and_gradients_as_peft(variant):
    """specs/road.yaml (the rotation core) is PEFT's RoAd for each road_variant."""
    from peft import RoadConfig

    base = llama()
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.from_spec("road", group_size=8, road_variant=variant))
    pcfg = RoadConfig(variant=f"road_{variant}", group_size=8, target_modules=QV)
    theirs = peft.get_peft_model(copy.deepcopy(base), pcfg)
    batch = {"input_ids": token_batch(seed=7, vocab=64)["input_ids"]}
    mapping = {"lora_theta": "road_theta.default", "lora_alpha": "road_alpha.default"}
    layers = {target: theirs.base_model.model.get_submodule(target) for target in ll.state(ours).targets}
    for target, layer in layers.items():
        m = ll.state(ours).targets[target].module
        for ours_k, path in mapping.items():
            assert getattr(m, ours_k).shape == peft_tensor(layer, path).shape, (target, ours_k)
    with torch.no_grad():
        base_logits = base(**batch).logits
    copied_tensors_match_peft(f"road_{variant}", ours, theirs, layers, mapping, batch, base_logits)


def test_lokr_on_smollm2_shape_same_shapes_count_logits_and_gradients_as_peft():
    """576 = 24 x 24 and 192 = 12 x 16: at PEFT's defaults (r 8, alpha 8) both libraries split
    q, k and v alike, train as many parameters and give the same logits and gradients."""
    from peft import LoKrConfig

    base = smollm2_shaped_layer()
    qkv = ["q_proj", "k_proj", "v_proj"]
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.from_spec("lokr", target_names=[rf"\.{t}$" for t in qkv]))
    theirs = peft.get_peft_model(copy.deepcopy(base), LoKrConfig(target_modules=qkv)).eval()
    mapping = {f"lora_lokr_{k}": f"lokr_{k}.default" for k in ("w1", "w2_a", "w2_b")}
    layers = {t: theirs.base_model.model.get_submodule(t) for t in ll.state(ours).targets}
    assert len(layers) == 3
    for target, layer in layers.items():
        m = ll.state(ours).targets[target].module
        for ours_k, path in mapping.items():
            assert getattr(m, ours_k).shape == peft_tensor(layer, path).shape, (target, ours_k)
        assert not m.lora_lokr_w1.any() and not peft_tensor(layer, mapping["lora_lokr_w1"]).any()
    assert ll.state(ours).targets["model.layers.0.self_attn.k_proj"].module.lora_lokr_w1.shape == (12, 24)
    theirs_count = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert sum(p.numel() for p in ll.trainable_parameters(ours)) == theirs_count
    batch = {"input_ids": token_batch(seed=7, vocab=64)["input_ids"]}
    with torch.no_grad():
        base_logits = base(**batch).logits
    copied_tensors_match_peft("lokr_smollm2", ours, theirs, layers, mapping, batch, base_logits)


def test_lokr_keeps_w2_factored_where_peft_switches_to_a_full_w2():
    """The documented divergence: at r=4 on the tiny q (k = n = 8: r >= max(k, n) / 2) PEFT holds a
    full (8, 8) w2; lora-lite keeps w2_a (8, 4) w2_b (4, 8), the same function class."""
    from peft import LoKrConfig

    base = llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), LoKrConfig(r=4, target_modules=QV))
    layer = theirs.base_model.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert "default" in layer.lokr_w2 and "default" not in layer.lokr_w2_a
    assert tuple(layer.lokr_w2["default"].shape) == (8, 8)
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.from_spec("lokr", r=4))
    m = ll.state(ours).targets["model.layers.0.self_attn.q_proj"].module
    assert (m.lora_lokr_w2_a.shape, m.lora_lokr_w2_b.shape) == ((8, 4), (4, 8))


def test_shape_functions_split_dimensions_as_pefts_lokr_factorization():
    """codegen.shapes.factorization (factor_m, factor_n) equals PEFT's on every dimension up to 600
    with factors -3..40, and on the dimensions of common models."""
    from peft.tuners.lokr.layer import factorization as peft_factorization

    from lora_lite.codegen.shapes import factorization

    for dim in [*range(1, 601), 896, 1536, 2048, 3072, 4096, 11008, 14336, 151936]:
        for factor in range(-3, 41):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


EMBED = {"lora_A": "lora_embedding_A.default", "lora_B": "lora_embedding_B.default"}


@pytest.mark.parametrize(
    "name, extra, scaled",
    [
        ("lora", {}, False),
        ("rslora", {"use_rslora": True}, False),
        ("dora", {"use_dora": True}, False),
        ("lora", {}, True),
        ("dora", {"use_dora": True}, True),
    ],
)
def test_embedding_target_same_logits_and_gradients_as_peft(name, extra, scaled):
    """nn.Embedding targets in PEFT's layout: lora_A (r, num_embeddings) = lora_embedding_A,
    lora_B (embedding_dim, r) = lora_embedding_B, DoRA's magnitude over embedding_dim. The
    embedding has a padding_idx (no gradient reaches A's padding column) and the batch holds it;
    `scaled`: an embedding with an embed_scale, which scales the update too (as PEFT)."""
    from peft import LoraConfig

    base = llama()
    base.model.embed_tokens.padding_idx = 0
    if scaled:
        base.model.embed_tokens = ScaledEmbedding(base.model.embed_tokens.weight.detach(), 0, 3.0)
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.from_spec(name, r=4, alpha=8.0, target_names=["embed_tokens"]))
    pcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"], lora_dropout=0.0, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), pcfg).eval()
    target = "model.embed_tokens"
    assert list(ll.state(ours).targets) == [target]
    layer = theirs.base_model.model.get_submodule(target)
    mapping = EMBED | ({"lora_magnitude_vector": "lora_magnitude_vector.default.weight"} if name == "dora" else {})
    m = ll.state(ours).targets[target].module
    for k, path in mapping.items():  # PEFT's shapes and init: A = 0, B ~ N(0, 1), m = ||W[:, j]||
        assert getattr(m, k).shape == peft_tensor(layer, path).shape, k
    assert not m.lora_A.any() and m.lora_B.std() > 0.5
    if name == "dora":
        assert rel_err(m.lora_magnitude_vector, peft_tensor(layer, mapping["lora_magnitude_vector"])) < RTOL
    n_ours = sum(p.numel() for p in ll.trainable_parameters(ours))
    assert n_ours == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    batch = {"input_ids": token_batch(seed=7, vocab=64, pad=0)["input_ids"]}
    batch["input_ids"][:, 0] = 0  # the padding id
    base_logits = base(**batch).logits
    with torch.no_grad():
        assert rel_err(theirs(**batch).logits, base_logits) < RTOL
        assert rel_err(ours(**batch).logits, base_logits) < RTOL
    copied_tensors_match_peft(f"{name} on embed_tokens", ours, theirs, {target: layer}, mapping, batch, base_logits)
    assert not m.lora_A.grad[:, 0].any()  # padding_idx: no gradient to A's padding column, as PEFT


@pytest.mark.parametrize("r", [256, 4])
def test_vera_same_projections_logits_and_gradients_as_peft(r):
    """specs/vera.yaml is PEFT's VeRA: the same seeded shared A and B (drawn, not copied), the
    same trainable count, and with PEFT's lambdas copied the same logits and gradients. r = 256
    (PEFT's default) exceeds every layer dimension of the tiny model; neither library clamps it."""
    from peft import VeraConfig

    base = llama()
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.from_spec("vera", r=r))
    theirs = peft.get_peft_model(copy.deepcopy(base), VeraConfig(r=r, target_modules=QV))
    batch = {"input_ids": token_batch(seed=7, vocab=64)["input_ids"]}
    layers = {target: theirs.base_model.model.get_submodule(target) for target in ll.state(ours).targets}
    for target, layer in layers.items():
        m = ll.state(ours).targets[target].module
        assert torch.equal(m.lora_vera_A, layer.vera_A["default"]), target  # the same generator draws
        assert torch.equal(m.lora_vera_B, layer.vera_B["default"]), target
        assert torch.equal(m.lora_vera_lambda_d, layer.vera_lambda_d["default"]), target
        assert torch.equal(m.lora_vera_lambda_b, layer.vera_lambda_b["default"]), target
    trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert sum(p.numel() for p in ll.trainable_parameters(ours)) == trainable
    with torch.no_grad():
        base_logits = base(**batch).logits
    mapping = {"lora_vera_lambda_d": "vera_lambda_d.default", "lora_vera_lambda_b": "vera_lambda_b.default"}
    copied_tensors_match_peft(f"vera r={r}", ours, theirs, layers, mapping, batch, base_logits)
