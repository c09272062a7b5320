"""The spec language as an algebra: every part defined once, the composition checked, the
runtime/module contract (lora_lite.Variant) complete, and every `works` cell of the matrix
passing the property checks on the tiny model."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

import lora_lite as ll
from conftest import calibration, lm_loss, logits, make_model, token_batch
from lora_lite.cli import main
from lora_lite.codegen import SpecError, load_spec, render
from lora_lite.codegen.algebra import cell_composition, cell_spec, handoff_problems, matrix, parts
from lora_lite.codegen.spec import parse_spec, schema_text, shipped_specs_dir
from lora_lite.variant import MEMBERS

ROOT = Path(__file__).resolve().parents[1]
ROWS = matrix()
WORKS = [r for r in ROWS if r["status"] == "works"]


def test_every_shipped_module_is_a_variant_with_every_member_typed():
    kinds = {
        "HOOK": ("output", "input"),
        "RESIDUAL": ("none", "crop", "subtract"),
        "CALIBRATION": ("none", "optional", "required"),
    }
    for name in ll.shipped_names():
        mod = ll.variant_module(name)
        assert isinstance(mod, ll.Variant), name
        for member, typ in ll.Variant.__annotations__.items():
            value = getattr(mod, member)
            want = {"str": str, "bool": bool, "float": float, "tuple": tuple, "dict": dict, "type": type}[typ]
            assert isinstance(value, want), (name, member, value)
            assert value in kinds.get(member, (value,)), (name, member, value)
        assert issubclass(mod.Config, ll.AdapterConfig) and set(mod.RANKS) <= set(mod.BOUNDS)
        for fn in ("shapes", "init", "forward", "frozen_weight"):
            assert callable(getattr(mod, fn)), (name, fn)


def _module_attributes_read(path: Path) -> set[str]:
    """Attributes lora_lite reads off a generated module: `gen.X`, `module.X`, `st.variant.X`,
    `cfg.variant().X`, `self.variant().X`."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        v = node.value
        if isinstance(v, ast.Name) and v.id in ("gen", "module"):
            out.add(node.attr)
        elif isinstance(v, ast.Attribute) and v.attr == "variant":
            out.add(node.attr)
        elif isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute) and v.func.attr == "variant":
            out.add(node.attr)
    return out


def test_the_runtime_reads_nothing_a_module_may_omit():
    read = set().union(*(_module_attributes_read(p) for p in (ROOT / "lora_lite").glob("*.py")))
    # SPEC_TEXT, __file__ and __dict__ are set by the registry itself on the modules it builds
    # from verified text (SPEC_TEXT is read back in spec_text)
    own = {"SPEC_TEXT", "__file__", "__dict__"}
    assert read - own <= set(MEMBERS), sorted(read - own - set(MEMBERS))
    assert {"HOOK", "CAST_INPUT", "PARAMS", "frozen_weight", "USES_BASE_WEIGHT", "QUANTIZED_BASE"} <= read


def test_schema_enums_are_the_part_definitions():
    text = (shipped_specs_dir() / "schema.json").read_text()
    assert schema_text(text) == text  # lora-lite gen rewrites them from codegen/parts
    defs = json.loads(text)["$defs"]
    assert defs["core_kind"]["enum"] == sorted(parts()["core"], key=lambda n: (n != "lowrank", n))
    assert set(defs["modifier_kind"]["enum"]) == set(parts()["modifier"])
    assert set(defs["basis_source"]["enum"]) == set(parts()["basis"])


def _refused(name: str, old: str, new: str) -> list[str]:
    text = (shipped_specs_dir() / f"{name}.yaml").read_text()
    assert old in text, old
    with pytest.raises(SpecError) as e:
        parse_spec(text.replace(old, new, 1), where=f"{name}.yaml", stem=name)
    return e.value.problems


@pytest.mark.parametrize(
    "name, old, new, rule",
    [
        ("lora", "params:\n", "params:\n  lora_extra: {shape: [r], init: zeros}\n", "unused-param"),
        ("lora", "lora_B: {shape: [d_out, r]", "lora_B: {shape: [r, d_out]", "shape"),
        ("pissa", "lora_A: {shape: [r, d_in], init: basis", "lora_A: {shape: [r, d_in], init: kaiming_uniform", "init"),
        (
            "ia3",
            "hyperparameters: {}",
            "hyperparameters: {alpha: {type: float, default: 8.0, min: 0.0, max: 1.0e+6, doc: s}}",
            "unused-hyper",
        ),
        ("delora", "[{kind: delora}]", "[{kind: delora}, {kind: scale, rule: alpha_over_r}]", "modifier-exclusive"),
        ("hra", "core: {kind: householder}", "core: {kind: householder}\nmodifiers: [{kind: magnitude}]", "modifier"),
        ("lora_fa", "tensors: [lora_A]", "tensors: [lora_U]", "modifier-option"),
    ],
)
def test_the_compiler_refuses_what_the_composition_would_not_read(name, old, new, rule):
    problems = _refused(name, old, new)
    assert any(f"(rule {rule}" in p for p in problems), problems


def test_a_shape_is_checked_symbolically_not_as_text():
    text = (shipped_specs_dir() / "antipasto_arrow.yaml").read_text()
    spec = parse_spec(text.replace("shape: [r - block]", "shape: [r + 0 - block * 1]"), "x.yaml", "antipasto_arrow")
    assert spec.params[1].shape == ("r + 0 - block * 1",)


def test_the_formula_follows_the_composition():
    text = (shipped_specs_dir() / "pissa.yaml").read_text()
    text = "".join(line for line in text.splitlines(True) if "svd_niter" not in line)  # an SVD-only knob
    moved = parse_spec(text.replace("{source: svd, select: top}", "{source: qr}"), "pissa.yaml", "pissa")
    doc = ast.get_docstring(ast.parse(render(moved)))
    assert "Q_r" in doc and "sqrt(S / s)" not in doc
    doc = ast.get_docstring(ast.parse(render(load_spec(shipped_specs_dir() / "rslora.yaml"))))
    assert "s = alpha / sqrt(r)" in doc


def test_every_working_basis_core_pair_honours_the_typed_hand_off():
    seen = set()
    for row in WORKS:
        comp = cell_composition(_cell(row))
        if (comp.basis.name, comp.select, comp.core.name) not in seen:
            seen.add((comp.basis.name, comp.select, comp.core.name))
            assert handoff_problems(comp) == [], row
    assert len(seen) >= 20


def test_matrix_json_counts_and_every_refusal_names_its_rule(capsys):
    assert main(["matrix", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(set(r) == {"basis", "core", "modifiers", "residual", "hook", "status", "rule"} for r in rows)
    assert all((r["status"] == "works") == (r["rule"] is None) for r in rows)
    works = [r for r in rows if r["status"] == "works"]
    assert len(works) >= 60
    assert len({(r["basis"], r["core"], tuple(r["modifiers"])) for r in works}) >= 25
    shipped = {(s.basis, s.core) for s in map(load_spec, shipped_specs_dir().glob("*.yaml"))}
    assert {(r["basis"].split("+")[0], r["core"]) for r in works} >= shipped


def _cell(row: dict) -> dict:
    basis, _, select = row["basis"].partition("+")
    return dict(row, basis=basis, select=select or None, modifiers=tuple(row["modifiers"]))


def _ids(row: dict) -> str:
    return "-".join([row["basis"], row["core"], "+".join(row["modifiers"]) or "plain", row["residual"], row["hook"]])


@pytest.mark.parametrize("row", WORKS, ids=_ids)
def test_works_cell_passes_the_property_checks(row, tmp_path, monkeypatch):
    """identity at init (or the core's stated reason), only adapter tensors train, save -> fresh
    model -> load is exact, detach restores the base."""
    monkeypatch.setenv("LORA_LITE_CACHE", str(tmp_path / "cache"))
    cell = _cell(row)
    name = "cell_" + hashlib.sha1(_ids(row).encode()).hexdigest()[:10]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cell_spec(cell, name), sort_keys=False))
    mod = ll.variant_module(path)
    cfg = ll.from_spec(path, **{k: 4 for k in ("r",) if k in mod.BOUNDS})
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = logits(model)
    ll.attach(model, cfg, calibration_data=calibration(n=2), progress=False)
    reason = parts()["core"][cell["core"]].meta.get("not_identity")
    if reason:
        assert not torch.allclose(logits(model), base), reason
    else:
        torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=1e-5)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[1] for n in trainable} == {k for k, (_, _, tr) in mod.PARAMS.items() if tr}
    opt = torch.optim.SGD(trainable.values(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        lm_loss(model, token_batch(seed=3)).backward()
        opt.step()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    trained = logits(model)
    assert not torch.equal(trained, base), "two steps should move the output"
    ll.save(model, tmp_path / "a.safetensors")
    fresh = make_model()
    ll.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(logits(fresh), trained)
    ll.detach(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=1e-6, msg=k)
    torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=1e-5)


# Defining properties of the compositions shipped as specs (where PEFT has no such method) -----


def _trained(name: str, steps: int = 3, **over):
    model = make_model()
    ll.attach(model, ll.from_spec(name, **{"r": 4, **over}), calibration_data=calibration(n=2), progress=False)
    opt = torch.optim.AdamW(ll.trainable_parameters(model), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        lm_loss(model, token_batch(seed=3)).backward()
        opt.step()
    return model


def test_lora_fa_never_changes_lora_a():
    torch.manual_seed(0)
    model = make_model()
    ll.attach(model, ll.from_spec("lora_fa", r=4))
    A0 = {n: st.module.lora_A.clone() for n, st in ll.state(model).targets.items()}
    opt = torch.optim.AdamW(ll.trainable_parameters(model), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        lm_loss(model, token_batch(seed=3)).backward()
        opt.step()
    for n, st in ll.state(model).targets.items():
        assert torch.equal(st.module.lora_A, A0[n]) and not st.module.lora_A.requires_grad
        assert st.module.lora_B.abs().sum() > 0  # B did train


def test_lora_xs_update_lies_in_the_span_of_the_frozen_u_and_vh():
    model = _trained("lora_xs")
    for name, st in ll.state(model).targets.items():
        m = st.module
        U, Vh = m.lora_U, m.lora_Vh  # (o, r), (r, i)
        eye = torch.eye(m.in_features)
        delta = m(eye) - eye @ m.weight.T - (m.bias if m.bias is not None else 0)  # (i, o) rows: the update on e_j
        dW = delta.T.detach()  # (o, i)
        assert dW.abs().max() > 1e-4, name
        inside = U @ (U.T @ dW @ Vh.T) @ Vh  # projection onto span(U) x span(Vh)
        torch.testing.assert_close(inside, dW, atol=1e-5, rtol=1e-4)


def test_milora_takes_the_smallest_singular_directions_and_crops_them():
    base = make_model()
    model = make_model()
    ll.attach(model, ll.from_spec("milora", r=4))
    for name, st in ll.state(model).targets.items():
        W = base.get_submodule(name).weight.detach()
        S = torch.linalg.svdvals(W)
        frozen = ll.state(model).variant.frozen_weight(st.module, st.cfg)
        torch.testing.assert_close(torch.linalg.svdvals(frozen)[:4], S[-4:], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(st.module.weight + frozen, W, atol=1e-5, rtol=1e-5)  # W_res + minor part = W


def test_antipasto_dora_is_antipasto_with_each_row_renormalised_by_its_magnitude():
    """With m set to the row norms of the adapted weight the magnitude is a no-op: antipasto_dora
    equals antipasto with the same gain g."""
    torch.manual_seed(0)
    a, b = make_model(), make_model()
    ll.attach(a, ll.from_spec("antipasto", r=4), calibration_data=calibration(n=2), progress=False)
    ll.attach(b, ll.from_spec("antipasto_dora", r=4), calibration_data=calibration(n=2), progress=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, st in ll.state(a).targets.items():
            mb = ll.state(b).targets[name].module
            st.module.lora_g.copy_(0.5 * torch.randn(st.module.lora_g.shape, generator=g))
            mb.lora_g.copy_(st.module.lora_g)
            S_eff = mb.lora_S * (1 + torch.nn.functional.elu(mb.lora_g))
            W_adapted = mb.weight + (mb.lora_U * S_eff) @ mb.lora_Vh  # W_res + U diag(S_eff) Vh
            mb.lora_magnitude_vector.copy_(torch.linalg.vector_norm(W_adapted, dim=1))
    torch.testing.assert_close(logits(b), logits(a), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(a), logits(make_model()), atol=1e-3)


def test_hra_dora_is_hra_followed_by_the_row_gain_m_over_the_norm_of_w():
    """W H has W's row norms (H orthogonal), so DoRA's scale on HRA is m / ||W_i||: with the same
    reflections, hra_dora's output is (HRA's output - b) * m / ||W_i|| + b, layer by layer."""
    torch.manual_seed(0)
    a, b = make_model(bias=True), make_model(bias=True)  # biases on: they must pass unscaled
    ll.attach(a, ll.from_spec("hra", r=4))
    ll.attach(b, ll.from_spec("hra_dora", r=4))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 32, generator=g)
    with torch.no_grad():
        for name, st in ll.state(a).targets.items():
            ma, mb = st.module, ll.state(b).targets[name].module
            ma.lora_hra_u.copy_(torch.randn(ma.lora_hra_u.shape, generator=g))  # distinct reflections
            mb.lora_hra_u.copy_(ma.lora_hra_u)
            mb.lora_magnitude_vector.mul_(1 + 0.5 * torch.randn(mb.lora_magnitude_vector.shape, generator=g))
            gain = mb.lora_magnitude_vector / torch.linalg.vector_norm(mb.weight, dim=1)  # (o,)
            want = (ma(x) - ma.bias) * gain + ma.bias
            assert not torch.allclose(ma(x), x @ ma.weight.T + ma.bias, atol=1e-2), "HRA should act"
            torch.testing.assert_close(mb(x), want, atol=1e-5, rtol=1e-5)


def test_readme_shows_the_matrix_and_names_every_part():
    from lora_lite.cli import matrix_markdown

    combos = [tuple(m["kind"] for m in load_spec(p).modifiers) for p in sorted(shipped_specs_dir().glob("*.yaml"))]
    rows = matrix(extra=[c for c in combos if len(c) > 1])
    section = (ROOT / "README.md").read_text().split("## How a variant is made", 1)[1].split("\n## ", 1)[0]
    assert matrix_markdown(rows) in section, "README's matrix is stale: paste `lora-lite matrix --markdown`"
    works = [r for r in rows if r["status"] == "works"]
    distinct = len({(r["basis"], r["core"], tuple(r["modifiers"])) for r in works})
    assert f"Of {len(rows):,} cells, {len(works)} work, in {distinct} distinct" in " ".join(section.split())
    for axis, named in parts().items():
        for name in named:
            assert f"`{name}`" in section, f"README does not describe the {axis} {name!r}"


def test_dropout_modifier_drops_the_adapter_input_only_in_training_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_LITE_CACHE", str(tmp_path / "cache"))
    cell = dict(basis="none", select=None, core="lowrank", modifiers=("dropout",), residual="none", hook="output")
    (tmp_path / "drop.yaml").write_text(yaml.safe_dump(cell_spec(cell, "drop"), sort_keys=False))
    model = make_model()
    ll.attach(model, ll.from_spec(tmp_path / "drop.yaml", r=4, dropout=0.5))
    with torch.no_grad():
        for st in ll.state(model).targets.values():
            st.module.lora_B.normal_()
    assert torch.equal(logits(model), logits(model))  # eval: no dropout
    model.train()
    assert not torch.equal(logits(model), logits(model))  # train: a fresh mask each call
    model.eval()
    ll.detach(model)
    torch.testing.assert_close(logits(model), logits(make_model()))  # detach gives the base back


def test_two_modifiers_compose_rslora_scale_with_lora_fa_frozen_a(tmp_path, monkeypatch):
    # the README's example of a modifier list: rsLoRA's s = alpha / sqrt(r) and LoRA-FA's frozen A
    monkeypatch.setenv("LORA_LITE_CACHE", str(tmp_path / "cache"))
    text = (shipped_specs_dir() / "rslora.yaml").read_text()
    text = text.replace("name: rslora", "name: rslora_fa")
    text = text.replace("rule: alpha_over_sqrt_r}]", "rule: alpha_over_sqrt_r}, {kind: frozen, tensors: [lora_A]}]")
    text = text.replace("init: kaiming_uniform, doc:", "init: kaiming_uniform, trainable: false, doc:")
    (tmp_path / "rslora_fa.yaml").write_text(text)
    assert main(["validate", str(tmp_path / "rslora_fa.yaml")]) == 0
    model = make_model()
    ll.attach(model, ll.from_spec(tmp_path / "rslora_fa.yaml", r=4, alpha=8.0))
    st = ll.state(model).targets["model.layers.0.self_attn.q_proj"]
    assert not st.module.lora_A.requires_grad and st.module.lora_B.requires_grad
    with torch.no_grad():
        st.module.lora_B.normal_()
        x = torch.randn(3, st.module.in_features)
        with ll.disabled(model):
            y_base = st.module(x)
        delta = st.module(x) - y_base
    expected = (8.0 / 2.0) * x @ st.module.lora_A.T @ st.module.lora_B.T  # s = alpha / sqrt(4) = 4
    torch.testing.assert_close(delta, expected)
