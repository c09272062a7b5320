"""scripts/reliability.py counts the bad-input tests by class: its table must name only tests
that exist, so a renamed test cannot silently drop out of the README's Reliability table."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("reliability", ROOT / "scripts" / "reliability.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _test_functions(files) -> set[str]:
    names = set()
    for f in files:
        tree = ast.parse((ROOT / f).read_text(encoding="utf-8"))
        names |= {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    return names


def test_every_classified_test_exists():
    rel = _script()
    missing = sorted(set(rel.FUNCTIONS) - _test_functions(rel.FILES))
    assert not missing, f"scripts/reliability.py names tests that do not exist: {missing}"


def test_table_counts_passes_and_failures_per_class():
    rel = _script()
    text, bad = rel.table(
        {
            "tests/test_specs.py::test_bad_spec_message[number_nan.yaml]": "passed",
            "tests/test_specs.py::test_bad_spec_message[yaml_alias.yaml]": "failed",
            "tests/bad_checkpoints/test_bad_checkpoints.py::"
            "test_bad_checkpoint_is_refused_in_one_line_and_changes_nothing[pickle file: x]": "passed",
            "tests/test_runtime.py::test_something_else": "passed",
        }
    )
    assert bad == 1
    assert "| spec | numbers (NaN, inf, bool, bounds, size) | 1 | 1 | 0 |" in text
    assert "| checkpoint | pickle file | 1 | 1 | 0 |" in text
    assert text.rstrip().endswith("| all | | 3 | 2 | 1 |")
