"""Spec loading and validation: every shipped spec is valid; bad specs fail with a one-line,
file- and key-path-naming message; nothing in a spec can inject code into a generated module."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_lite.cli import main
from lora_lite.codegen import SpecError, load_spec, render
from lora_lite.codegen.shapes import eval_shape_expr, factorization, parse_shape_expr, to_python

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
    "injection.yaml": ["$.summary: text holds a line break", "only identity, math, notes may span lines"],
    "injection_name.yaml": ["$.name: text holds a line break"],
    "injection_math.yaml": ["$.math", "triple quotes"],
    "injection_hyper.yaml": [
        "injection_hyper.yaml:13:",
        "$.hyperparameters['alpha: float = 1\\nimport os']: a key holds a line break",
    ],
    "name_mismatch.yaml": ["$.name: 'something_else' must equal the file name 'name_mismatch'"],
    "missing_tensor.yaml": ["$.params: core 'lowrank' on basis 'none' needs tensor 'lora_B'", "rule missing-param"],
    "crop_without_basis.yaml": ["$.residual: crop needs a basis", "rule residual-without-frozen-part"],
    "subtract_without_basis.yaml": ["$.residual: subtract needs a basis", "rule residual-without-frozen-part"],
    "svd_without_residual.yaml": ["$.residual: basis 'svd' puts part of W into the", "rule residual-counts-twice"],
    "shadowing_name.yaml": ["$.hyperparameters.variant: 'variant' is reserved"],
    "bad_regex.yaml": ["$.target.names[0]: bad regex '(q_proj'"],
    # YAML and the document itself: refused before anything is built from it
    "yaml_alias.yaml": ["yaml_alias.yaml:14:", "$: YAML aliases (*r) are not allowed"],
    "yaml_deep_nesting.yaml": ["yaml_deep_nesting.yaml:10:", "nested deeper than 20 levels"],
    "yaml_not_utf8.yaml": ["yaml_not_utf8.yaml:3:", "not UTF-8 (byte 0xe9"],
    "yaml_key_not_a_string.yaml": ["yaml_key_not_a_string.yaml:13:", "$.hyperparameters: key '1' is not a string"],
    "yaml_not_a_mapping.yaml": ["$: expected a mapping of spec fields, got list"],
    "yaml_two_documents.yaml": ["yaml_two_documents.yaml:24:", "YAML syntax error", "another document"],
    "yaml_python_tag.yaml": ["yaml_python_tag.yaml:3:", "could not determine a constructor", "python/object"],
    "yaml_date.yaml": ["$.references[0].year: YAML date values are not allowed"],
    "yaml_int_too_long.yaml": ["$.hyperparameters.r.default: an integer of 5000 characters"],
    # prose: no control characters, line separators or what a docstring or comment cannot carry
    "prose_cr.yaml": ["prose_cr.yaml:3:", "$.title: text holds U+000D"],
    "prose_nul.yaml": ["$.title: text holds U+0000"],
    "prose_nel.yaml": ["$.summary: text holds U+0085"],
    "prose_line_separator.yaml": ["$.math: text holds U+2028 LINE SEPARATOR"],
    "prose_paragraph_separator.yaml": ["$.identity: text holds U+2029 PARAGRAPH SEPARATOR"],
    "prose_lone_surrogate.yaml": ["prose_lone_surrogate.yaml:3: $"],  # libyaml refuses the escape itself
    "prose_bidi_override.yaml": ["$.title: text holds U+202E RIGHT-TO-LEFT OVERRIDE"],
    "prose_tab.yaml": ["$.hyperparameters.r.doc: text holds U+0009"],
    "prose_line_break_in_a_line.yaml": ["$.params.lora_A.doc: text holds a line break"],
    "prose_backslash.yaml": ["$.math: text may not contain backslashes"],
    "target_line_break.yaml": ["$.target.names[0]: text holds a line break"],
    # numbers: finite, typed, inside the declared bounds, and every int/float declares both
    "number_nan.yaml": ["$.hyperparameters.alpha.default: nan is not a finite number"],
    "number_infinite_lr.yaml": ["$.train.lr: inf is not a finite number"],
    "number_bool_for_float.yaml": ["$.hyperparameters.alpha.default: True is not a float"],
    "number_below_min.yaml": ["$.hyperparameters.r.default: 0 is below min 1"],
    "number_above_max.yaml": ["$.hyperparameters.r.default: 100000 is above max 65536"],
    "number_missing_max.yaml": ["$.hyperparameters.r: 'max' is a required property"],
    "number_min_above_max.yaml": ["$.hyperparameters.alpha.min: min 1000000.0 is above max -1000000.0"],
    "number_float_bounds_for_int.yaml": ["$.hyperparameters.r.max: 65536.5: the bounds of an int"],
    "number_bounds_on_bool.yaml": ["$.hyperparameters.flag.min: a bool hyperparameter has no bounds"],
    "number_too_large.yaml": ["$.hyperparameters.alpha.max: 1e+300 is larger than 2**53"],
    "number_written_as_text.yaml": ["'1.0e6' is not of type 'number'", "write 1.0e+6"],
    # shapes: evaluated with the defaults, sizes in [1, 2**31], no division by zero possible
    "shape_zero.yaml": ["$.params.lora_A.shape[0]: 'r - r' is 0 with the defaults"],
    "shape_too_large.yaml": ["'d_in * d_in * d_in * d_in * d_in * d_in' is 68719476736 with the defaults"],
    "shape_division_by_zero.yaml": ["$.params.lora_A.shape[0]: bad shape expression: 'd_in // 0': // divides only"],
    "shape_division_by_a_name.yaml": ["'d_in // (r - 8)': // divides only by a positive integer or a"],
    "shape_divisor_may_be_zero.yaml": ["divides by 'oft_block_size', whose min must be at least 1"],
    "shape_characters.yaml": ["$.params.lora_A.shape[0]: 'r\"' does not match"],
}
# Bad specs too big to keep as files: name -> (text made from lora.yaml, fragments of the first error)
_LORA = (ROOT / "specs" / "lora.yaml").read_text()
GENERATED = {
    "huge.yaml": (_LORA + "# padding\n" * 30_000, ["huge.yaml: $: larger than 256 KiB"]),
    "many_nodes.yaml": (
        _LORA.replace("names: ['\\.q_proj$', '\\.v_proj$']", "names: [" + ", ".join(["q"] * 20_001) + "]"),
        ["many_nodes.yaml:12: $: more than 20000 YAML nodes"],
    ),
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


@pytest.mark.parametrize("fname", sorted(GENERATED))
def test_generated_bad_spec_message(fname, tmp_path):
    text, fragments = GENERATED[fname]
    (tmp_path / fname).write_text(text)
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / fname)
    assert len(e.value.problems) == 1 and "\n" not in str(e.value)
    for frag in fragments:
        assert frag in str(e.value), f"{frag!r} not in {str(e.value)!r}"


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


@pytest.mark.parametrize(
    "expr,value",
    [
        ("factor_m(d_in, -1)", 8),  # 64 = 8 x 8
        ("factor_n(d_out, -1)", 8),  # 48 = 6 x 8, smaller first
        ("factor_m(d_out, -1)", 6),
        ("factor_m(d_out, block) * r", 16),  # a factor that divides comes first: 48 = 2 x 24
        ("factor_n(d_out, block)", 24),
        ("factor_n(d_in + r, 0)", 72),  # factor 0: (1, d), as PEFT
    ],
)
def test_shape_functions_give_pefts_kronecker_factor_sizes(expr, value):
    tree = parse_shape_expr(expr)
    assert eval_shape_expr(tree, {"r": 8, "block": 2, "d_in": 64, "d_out": 48}) == value
    assert to_python(tree, "cfg").count("factor_") == 1 and "cfg.factor" not in to_python(tree, "cfg")


@pytest.mark.parametrize(
    "expr",
    [
        *["r ** 2", "f(r)", "r.x", "'a'", "r if r else 1", "1.5", "[r]", "r / 2"],
        *["eval(r)", "factor_m", "factor_m(d_in)", "factor_m(d_in, r, r)", "factor_m(d_in, factor=r)"],
        *["factor_m(*d_in)", "cfg.factor_m(d_in, r)", "factor_m(d_in, r)(r)", "d_in // factor_m(d_in, r)"],
    ],
)
def test_shape_expressions_refused(expr):
    with pytest.raises(ValueError, match="not allowed|cannot parse|plain arguments|call it|divides only"):
        parse_shape_expr(expr)


@pytest.mark.parametrize("dim", [0, -4, 2**31 + 1])
def test_shape_functions_refuse_dimensions_out_of_range(dim):
    with pytest.raises(ValueError, match=r"outside \[1, 2\*\*31\]"):
        eval_shape_expr(parse_shape_expr("factor_m(d_in, -1)"), {"d_in": dim})


def test_factorization_of_a_large_prime_is_quick_and_exact():
    assert factorization(2**31 - 1, -1) == (1, 2**31 - 1)  # a prime: O(sqrt(d)) steps, not O(d)
    assert factorization(2**31, -1) == (32768, 65536)


def test_validate_cli_exit_status(capsys):
    assert main(["validate", *map(str, sorted((ROOT / "specs").glob("*.yaml")))]) == 0
    assert main(["validate", str(BAD / "unknown_key.yaml")]) == 1
    err = capsys.readouterr().err
    assert "unexpected key 'rnak'" in err


def test_a_renamed_rank_reports_the_missing_name_not_a_shape_differing_from_itself(tmp_path):
    """Renaming `r` in a copy of lora.yaml: each problem is one line (unknown name, missing-hyper,
    unused-hyper) and no line claims ['r', 'd_in'] differs from ['r', 'd_in']."""
    text = (
        (ROOT / "specs" / "lora.yaml")
        .read_text()
        .replace("\n  r: ", "\n  rnak: ")
        .replace("name: lora\n", "name: lora2\n")
    )
    (tmp_path / "lora2.yaml").write_text(text)
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / "lora2.yaml")
    assert "rule missing-hyper" in str(e.value) and "rule unused-hyper" in str(e.value)
    assert "rule shape" not in str(e.value)
    assert all(line.startswith(str(tmp_path / "lora2.yaml")) for line in e.value.problems)


@pytest.mark.parametrize(
    "spec, name, key, value, part",
    [
        ("pissa", "svd_niter", "max", 2**40, "'svd' takes"),  # a loop count: svd_lowrank would run for days
        ("oft", "num_cayley_neumann_terms", "max", 10**9, "'orthogonal' takes"),
        ("boft", "boft_n_butterfly_factor", "max", 100, "'butterfly' takes"),
        ("lokr", "decompose_factor", "min", -(2**40), "'kronecker' takes"),
    ],
)
def test_hyperparameter_bounds_wider_than_its_part_takes_are_refused(tmp_path, spec, name, key, value, part):
    import yaml

    data = yaml.safe_load((ROOT / "specs" / f"{spec}.yaml").read_text())
    data["hyperparameters"][name][key] = value
    (tmp_path / f"{spec}.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / f"{spec}.yaml")
    text = str(e.value)
    assert "\n" not in text and f"$.hyperparameters.{name}.{key}: {value} is outside" in text, text
    assert f"{part} (rule bounds)" in text, text
