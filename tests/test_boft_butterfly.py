"""BOFT with butterfly factors (arXiv 2311.06243): properties of the blockwise forward.

The generated forward applies each factor to x as a permutation, b x b products and the inverse
permutation. Here the dense (d_in, d_in) product is built independently, by scattering each
Cayley block into the rows and columns the paper's butterfly permutation gives it, and the two
must agree. PEFT parity at factors >= 2 is in test_peft_parity.py.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, safe_open
from torch import nn

import lora_lite as ll
from conftest import assert_unchanged, logits, make_model, perturb, snapshot
from lora_lite.generated import boft

FIXTURE = __import__("pathlib").Path(__file__).parent / "fixtures" / "boft_factor1_layout"


def cayley(M: torch.Tensor) -> torch.Tensor:
    """(I - Q)(I + Q)^-1 with Q the skew part of each (b, b) block of M (..., b, b), in fp64."""
    M = M.double()
    Q = 0.5 * (M - M.transpose(-2, -1))
    eye = torch.eye(M.shape[-1], dtype=M.dtype)
    return (eye - Q) @ torch.linalg.inv(eye + Q)


def butterfly_factor(R: torch.Tensor, k: int, d: int) -> torch.Tensor:
    """Dense factor k, (d, d), from its blocks R (n, b, b): block j of group g (groups of 2^k b
    inputs) acts on the half-blocks j and j + 2^k of that group (P_0 = I: contiguous blocks)."""
    n, b, _ = R.shape
    stride, h = 2**k, b // 2
    B = torch.zeros(d, d, dtype=R.dtype)
    for q in range(n):
        g, j = divmod(q, stride)
        start = g * stride * b
        if k == 0:
            idx = torch.arange(q * b, q * b + b)
        else:
            idx = torch.cat([start + j * h + torch.arange(h), start + (j + stride) * h + torch.arange(h)])
        B[idx[:, None], idx[None, :]] = R[q]
    return B


def butterfly_dense(M: torch.Tensor, d: int) -> torch.Tensor:
    """x R as x @ D: D = B_(f-1) ... B_1 B_0 (PEFT's boft_rotation), from learned M (f, n, b, b)."""
    D = torch.eye(d, dtype=torch.float64)
    for k in reversed(range(M.shape[0])):
        D = D @ butterfly_factor(cayley(M[k]), k, d)
    return D


def layer_with(M: torch.Tensor, s: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain linear layer holding the BOFT tensors, for the generated forward called directly."""
    m = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None)
    with torch.no_grad():
        m.weight.copy_(W)
        if bias is not None:
            m.bias.copy_(bias)
    m.lora_boft_R = nn.Parameter(M.clone())
    m.lora_boft_s = nn.Parameter(s.clone())
    return m


def rotation_of(M: torch.Tensor, b: int) -> torch.Tensor:
    """The module's rotation read back through its forward: W = I, s = 1, x = I gives x R = R."""
    d = M.shape[1] * b
    m = layer_with(M, torch.ones(d, 1), torch.eye(d), None)
    cfg = boft.Config(boft_block_size=b, boft_n_butterfly_factor=M.shape[0])
    x = torch.eye(d)
    with torch.no_grad():
        return boft.forward(m, x, m(x), cfg).double()


@pytest.mark.parametrize("factors, b", [(2, 4), (3, 4), (4, 2), (3, 8)])
def test_each_butterfly_factor_is_orthogonal_and_mixes_inputs_2k_half_blocks_apart(factors, b):
    d = 64
    g = torch.Generator().manual_seed(factors * 10 + b)
    M = torch.randn(factors, d // b, b, b, generator=g)
    for k in range(factors):
        only_k = torch.zeros_like(M)
        only_k[k] = M[k]
        F = rotation_of(only_k, b)  # (d, d) factor k alone
        err = float((F @ F.T - torch.eye(d, dtype=F.dtype)).abs().max())
        assert err < 1e-5, f"factor {k}: |F F^T - I|_max = {err:.1e}"
        # which inputs factor k mixes: input p with the half-block 2^k away within its group
        mixed = F.abs() > 1e-6
        half = torch.arange(d) // (b // 2)  # half-block of each input
        group = torch.arange(d) // (2**k * b)
        same_pair = (half[:, None] % 2**k == half[None, :] % 2**k) & (group[:, None] == group[None, :])
        assert not bool((mixed & ~same_pair).any()), f"factor {k} mixes inputs outside its butterfly pairs"
        assert bool(mixed[0, (2**k) * (b // 2)]), f"factor {k} should mix input 0 with the half-block 2^k away"


@pytest.mark.parametrize("factors, b", [(1, 4), (1, 3), (2, 4), (3, 2), (3, 4), (4, 4)])
def test_blockwise_forward_equals_x_times_the_dense_butterfly_product(factors, b):
    d_in, d_out = 48 if b == 3 else 64, 24
    g = torch.Generator().manual_seed(7 + factors)
    M = torch.randn(factors, d_in // b, b, b, generator=g)
    s = 1 + 0.1 * torch.randn(d_out, 1, generator=g)
    W, bias = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
    x = torch.randn(3, 5, d_in, generator=g)  # (batch, tokens, i)
    m = layer_with(M, s, W, bias)
    cfg = boft.Config(boft_block_size=b, boft_n_butterfly_factor=factors)
    with torch.no_grad():
        got = boft.forward(m, x, m(x), cfg).double()
    D = butterfly_dense(M, d_in)  # (i, i), the rotation as a dense matrix, fp64
    want = s[:, 0].double() * ((x.double() @ D) @ W.double().T) + bias.double()  # (..., o)
    err = float((got - want).abs().max() / want.abs().max())
    assert err < 1e-5, f"blockwise forward vs dense product: relative error {err:.1e}"
    assert float((D @ D.T - torch.eye(d_in, dtype=D.dtype)).abs().max()) < 1e-10  # the product is orthogonal
    plain = s[:, 0].double() * (x.double() @ W.double().T) + bias.double()
    assert float((want - plain).abs().max()) > 1e-2  # the rotation changes the output


def test_attach_starts_at_the_identity_with_factors():
    model, ref = make_model(), logits(make_model())
    ll.attach(model, ll.from_spec("boft", boft_block_size=4, boft_n_butterfly_factor=4))
    for t in ll.state(model).targets.values():
        assert tuple(t.module.lora_boft_R.shape) == (4, 8, 4, 4)  # (f, n, b, b) as PEFT's boft_R
    assert torch.equal(logits(model), ref)


def test_save_load_exact_at_two_factors(tmp_path):
    model = make_model()
    ll.attach(model, ll.from_spec("boft", boft_block_size=4, boft_n_butterfly_factor=2))
    perturb(model)
    want = logits(model)
    assert float((want - logits(make_model())).abs().max()) > 1e-3
    ll.save(model, tmp_path / "a.safetensors")
    fresh = make_model()
    ll.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(logits(fresh), want)
    for name, t in ll.state(model).targets.items():
        got = ll.state(fresh).targets[name].module
        for k in ("lora_boft_R", "lora_boft_s"):
            assert torch.equal(getattr(got, k), getattr(t.module, k)), (name, k)
    ll.save(fresh, tmp_path / "b.safetensors")
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_saved_before_butterfly_factors_loads_with_its_logits(tmp_path):
    """A one-factor checkpoint from before factors >= 2 stores lora_boft_R as (n, b, b) with the
    spec text of that time; it loads as (1, n, b, b), bit for bit, and saves in today's layout."""
    path = FIXTURE / "boft.safetensors"
    with safe_open(str(path), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert saved["model.layers.0.self_attn.q_proj.lora_boft_R"].shape == (8, 4, 4)
    model = make_model()
    ll.load(model, path)
    for key, t in saved.items():
        target, name = key.rsplit(".", 1)
        got = getattr(model.get_submodule(target), name)
        assert torch.equal(got, t.reshape(got.shape)), key
        assert got.shape == ((1, *t.shape) if name == "lora_boft_R" else t.shape), key
    assert torch.equal(logits(model), load_file(FIXTURE / "expected_logits.safetensors")["boft"])
    ll.save(model, tmp_path / "new.safetensors")
    fresh = make_model()
    ll.load(fresh, tmp_path / "new.safetensors")
    assert torch.equal(logits(fresh), logits(model))


class Proj(nn.Module):
    def __init__(self, d_in: int):
        super().__init__()
        self.proj = nn.Linear(d_in, 8)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize(
    "d_in, b, factors, message",
    [
        (32, 4, 5, "boft_block_size * 2^(boft_n_butterfly_factor - 1) = 4 * 16 dividing d_in=32"),
        (24, 4, 3, "boft_block_size * 2^(boft_n_butterfly_factor - 1) = 4 * 4 dividing d_in=24"),
        (30, 4, 1, "= 4 * 1 dividing d_in=30"),
        (48, 3, 2, "boft_n_butterfly_factor=2 > 1 needs an even boft_block_size, got 3"),
    ],
)
def test_layer_the_butterfly_does_not_fit_is_refused_naming_it(d_in, b, factors, message):
    model = Proj(d_in)
    snap = snapshot(model)
    cfg = ll.from_spec("boft", boft_block_size=b, boft_n_butterfly_factor=factors, target_names=[r"^proj$"])
    with pytest.raises(ll.AttachError) as e:
        ll.attach(model, cfg)
    text = str(e.value)
    assert "\n" not in text and "proj" in text and message in text, text
    assert_unchanged(model, snap)


def _rewritten(tmp_path, spec: str, kw: dict, hyper: dict, tensor_shapes: dict) -> str:
    """A valid checkpoint of `spec` (digest and all) whose hyperparameters say `hyper` and whose
    tensors ending in a `tensor_shapes` key have that shape: a crafted file the shapes fit."""
    import json

    from safetensors.torch import save_file

    from lora_lite.checkpoint import digest

    model = make_model()
    ll.attach(model, ll.from_spec(spec, **kw))
    path = ll.save(model, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_lite"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for values in [meta["config"], *(t["hyperparameters"] for t in meta["targets"].values())]:
        values.update(hyper)
    for k in tensors:
        shape = tensor_shapes.get(k.rsplit(".", 1)[-1])
        tensors[k] = tensors[k] if shape is None else torch.zeros(shape)
    meta["sha256"] = digest(meta, tensors)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"lora_lite": json.dumps(meta)})
    return str(tmp_path / "bad.safetensors")


@pytest.mark.parametrize(
    "spec, kw, hyper, tensor_shapes, message",
    [  # q_proj and v_proj have d_in = 32; their d_out are 32 and 16
        ("boft", {}, {"boft_n_butterfly_factor": 5}, {"lora_boft_R": (5, 8, 4, 4)}, "= 4 * 16 dividing d_in=32"),
        ("boft", {}, {"boft_block_size": 3}, {"lora_boft_R": (1, 10, 3, 3)}, "= 3 * 1 dividing d_in=32"),
        ("oft", {}, {"oft_block_size": 5}, {"lora_oft_R": (6, 10)}, "oft_block_size dividing d_in=32"),
        ("road", {"group_size": 8}, {"group_size": 12}, {}, "even group_size dividing d_out=32"),
    ],
)
def test_checkpoint_whose_shapes_fit_but_hyperparameters_do_not_fit_the_layer_is_refused_at_load(
    tmp_path, spec, kw, hyper, tensor_shapes, message
):
    path = _rewritten(tmp_path, spec, kw, hyper, tensor_shapes)
    model = make_model()
    snap = snapshot(model)
    with pytest.raises(ll.CheckpointError) as e:
        ll.load(model, path)
    text = str(e.value)
    where = "$.targets.model.layers.0.self_attn.q_proj.hyperparameters"
    assert "\n" not in text and where in text and message in text, text
    assert_unchanged(model, snap)
