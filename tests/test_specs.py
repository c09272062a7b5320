"""Spec loading and validation: every shipped spec is valid; bad specs fail with a one-line,
file- and key-path-naming message; nothing in a spec can inject code into a generated module."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_lite.cli import main
from lora_lite.codegen import SpecError, load_spec, render
from lora_lite.codegen.shapes import eval_shape_expr, parse_shape_expr

ROOT = Path(__file__).resolve().parents[1]
BAD = Path(__file__).parent / "bad_specs"

# file in tests/bad_specs -> fragments its first error line must contain
EXPECTED = {
    "unknown_key.yaml": ["unknown_key.yaml:24:", "$: unexpected key 'rnak'"],
    "wrong_type.yaml": ["wrong_type.yaml:12:", "$.hyperparameters.r.default", "'eight' is not of type"],
    "bad_shape.yaml": ["bad_shape.yaml:20:", "$.params.lora_A.shape[1]", "bad shape expression", "'__import__(1)'"],
    "unknown_name_in_shape.yaml": ["$.params.lora_A.shape[0]", "unknown name 'rank'"],
    "yaml_syntax.yaml": ["yaml_syntax.yaml:", "YAML syntax error"],
    "duplicate_key.yaml": ["duplicate_key.yaml:19:", "duplicate key 'hook' (first at line 18)"],
    "bad_enum.yaml": ["bad_enum.yaml:16:", "$.core.kind: 'magnitde' is not one of ['lowrank'"],
    "injection.yaml": ["$.summary", "triple quotes"],
    "injection_name.yaml": ["$.name", "does not match"],
    "injection_math.yaml": ["$.math", "triple quotes"],
    "injection_hyper.yaml": ["$.hyperparameters", "does not match"],
    "name_mismatch.yaml": ["$.name: 'something_else' must equal the file name 'name_mismatch'"],
    "missing_tensor.yaml": ["$.params: core 'lowrank' on basis 'none' needs tensor 'lora_B'", "rule missing-param"],
    "crop_without_basis.yaml": ["$.residual: crop needs a basis", "rule residual-without-frozen-part"],
    "subtract_without_basis.yaml": ["$.residual: subtract needs a basis", "rule residual-without-frozen-part"],
    "svd_without_residual.yaml": ["$.residual: basis 'svd' puts part of W into the", "rule residual-counts-twice"],
    "shadowing_name.yaml": ["$.hyperparameters.variant: 'variant' is reserved"],
    "bad_regex.yaml": ["$.target.names[0]: bad regex '(q_proj'"],
}


@pytest.mark.parametrize("path", sorted((ROOT / "specs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_spec_is_valid(path):
    spec = load_spec(path)
    assert spec.name == path.stem


@pytest.mark.parametrize("fname", sorted(EXPECTED))
def test_bad_spec_message(fname):
    with pytest.raises(SpecError) as e:
        load_spec(BAD / fname)
    first = e.value.problems[0]
    assert "\n" not in first
    assert str(BAD / fname) in first
    for frag in EXPECTED[fname]:
        assert frag in first, f"{frag!r} not in {first!r}"


def test_every_bad_spec_has_an_expectation():
    assert sorted(p.name for p in BAD.glob("*.yaml")) == sorted(EXPECTED)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(SpecError, match="empty file"):
        load_spec(tmp_path / "empty.yaml")


def test_regex_with_quotes_is_rendered_as_a_literal(tmp_path):
    text = (
        (ROOT / "specs/lora.yaml")
        .read_text()
        .replace("names: ['\\.q_proj$', '\\.v_proj$']", "names: ['q_proj\"\"\"; import os #', \"x'''\"]")
    )
    (tmp_path / "lora.yaml").write_text(text)
    src = render(load_spec(tmp_path / "lora.yaml"))
    ns: dict = {}
    exec(compile(src.split("\n@dataclass")[0], "gen", "exec"), ns)  # module constants only
    assert ns["TARGET_NAMES"] == ('q_proj"""; import os #', "x'''")
    assert "import os\n" not in src


@pytest.mark.parametrize(
    "expr,value", [("r", 8), ("d_out", 48), ("r - block", 6), ("2 * r + 1", 17), ("d_in // 4", 16), (3, 3)]
)
def test_shape_expressions(expr, value):
    assert eval_shape_expr(parse_shape_expr(expr), {"r": 8, "block": 2, "d_in": 64, "d_out": 48}) == value


@pytest.mark.parametrize("expr", ["r ** 2", "f(r)", "r.x", "'a'", "r if r else 1", "1.5", "[r]", "r / 2"])
def test_shape_expressions_refused(expr):
    with pytest.raises(ValueError, match="not allowed|cannot parse"):
        parse_shape_expr(expr)


def test_validate_cli_exit_status(capsys):
    assert main(["validate", *map(str, sorted((ROOT / "specs").glob("*.yaml")))]) == 0
    assert main(["validate", str(BAD / "unknown_key.yaml")]) == 1
    err = capsys.readouterr().err
    assert "unexpected key 'rnak'" in err
