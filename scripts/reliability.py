"""Tables the classes of bad input the test suite throws at lora-lite, and what came of each.

    python scripts/reliability.py                 # print the markdown table
    python scripts/reliability.py --write-readme  # replace the table in README.md's Reliability section

It runs the bad-input tests (bad specs, hostile strings in every spec field, the generated-code
allow-list, bad checkpoints, save under faults, runtime misuse) with pytest and counts, per
class, the inputs tried and the outcome. Every one of those tests asserts the same contract: a
one-line SpecError, CheckpointError or AttachError that names the thing, no code run, the model
unchanged (or, for the payload and allow-list rows, the hostile text only ever inside a string
constant). A passed test is therefore a "clear refusal"; anything else is counted as "other"
and the script exits 1.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [
    "tests/test_specs.py",
    "tests/test_untrusted_specs.py",
    "tests/bad_checkpoints/test_bad_checkpoints.py",
    "tests/test_checkpoint.py",
    "tests/test_runtime_misuse.py",
    "tests/test_layer_kinds.py",
    "tests/test_deploy.py",
    "tests/test_named_adapters.py",
    "tests/test_deploy_anywhere.py",
]
BEGIN, END = "<!-- reliability:begin -->", "<!-- reliability:end -->"

# bad spec files by name prefix -> class
SPEC_FILE_CLASSES = [
    ("yaml_", "YAML document (aliases, nesting, encoding, tags, keys, size)"),
    ("duplicate_key", "YAML document (aliases, nesting, encoding, tags, keys, size)"),
    ("number_", "numbers (NaN, inf, bool, bounds, size)"),
    ("prose_", "prose control characters and escapes"),
    ("injection", "code injection through prose, names, keys"),
    ("target_", "code injection through prose, names, keys"),
    ("shape_", "shape expressions"),
    ("bad_shape", "shape expressions"),
    ("unknown_name_in_shape", "shape expressions"),
]
# test function -> (area, class, inputs per test)
FUNCTIONS = {
    "test_generated_bad_spec_message": ("spec", "YAML document (aliases, nesting, encoding, tags, keys, size)", 1),
    "test_shape_expressions_refused": ("spec", "shape expressions", 1),
    "test_shape_functions_refuse_dimensions_out_of_range": ("spec", "shape expressions", 1),
    "test_missing_file_and_empty_file": ("spec", "missing or empty spec file", 2),
    "test_a_spec_path_that_is_not_a_regular_file_is_refused_without_reading": ("spec", "missing or empty spec file", 3),
    "test_payload_in_any_string_field_is_refused_or_stays_a_string": (
        "spec",
        "hostile strings in every string field of the schema (15 payloads each)",
        15,
    ),
    "test_verify_refuses_what_generated_code_may_not_hold": ("spec", "generated code outside the allow-list", 1),
    "test_verify_requires_annotations_to_stay_unevaluated": ("spec", "generated code outside the allow-list", 1),
    "test_literal_refuses_what_is_not_a_finite_plain_value": ("spec", "values the literal maker refuses", 1),
    "test_doc_text_cannot_close_a_docstring": ("spec", "prose control characters and escapes", 1),
    "test_from_spec_bad_override_is_a_one_line_spec_error": ("spec", "bad ll.from_spec overrides", 1),
    "test_user_spec_is_imported_from_verified_text_not_from_the_cache": ("spec", "planted or symlinked cache files", 1),
    "test_symlinked_cache_destination_is_replaced_not_followed": ("spec", "planted or symlinked cache files", 1),
    "test_gen_replaces_a_symlinked_destination_without_touching_its_target": (
        "spec",
        "planted or symlinked cache files",
        1,
    ),
    "test_concurrent_gen_and_readers_never_see_a_partial_file": ("spec", "concurrent gen and readers", 1),
    "test_models_load_cannot_adapt_are_refused_unchanged": ("checkpoint", "model does not fit", 3),
    "test_loading_never_unpickles": ("checkpoint", "pickle file", 1),
    "test_format_1_checkpoint_with_an_edited_spec_is_compiled_and_its_errors_name_the_spec": (
        "checkpoint",
        "bad spec text",
        1,
    ),
    "test_save_refuses_non_finite_tensors_and_leaves_the_destination_untouched": (
        "save",
        "non-finite adapter tensors",
        1,
    ),
    "test_a_failing_write_removes_its_temporary_file_and_keeps_the_old_checkpoint": ("save", "write fails midway", 1),
    "test_a_file_that_would_not_load_back_is_never_put_in_place": ("save", "write fails midway", 1),
    "test_stale_temporary_files_are_removed_and_a_live_locked_one_is_kept": (
        "save",
        "killed and concurrent saves",
        1,
    ),
    "test_a_save_racing_a_cleaner_never_loses_its_temporary_file": ("save", "killed and concurrent saves", 1),
    "test_save_through_a_symlink_replaces_the_real_file_and_keeps_the_link": ("save", "symlink destination", 1),
    "test_save_keeps_the_destination_mode_and_new_files_get_the_umask_mode": ("save", "permissions", 1),
    "test_io_errors_name_the_path": ("save", "I/O errors (read-only, directory)", 1),
    "test_bad_config_values_are_one_line_spec_errors": ("runtime", "bad config values", 1),
    "test_bad_calibration_data_is_refused_before_anything_changes": ("runtime", "bad calibration data", 1),
    "test_non_finite_activations_name_the_layer_and_change_nothing": ("runtime", "bad calibration data", 1),
    "test_runtime_misuse_is_refused_and_changes_nothing": ("runtime", "misuse of attach/detach/load/set_coeff", 1),
    "test_a_variant_init_failing_on_the_third_layer_changes_nothing": ("runtime", "failure midway through attach", 1),
    "test_a_crop_failing_on_the_third_layer_takes_everything_back_out": (
        "runtime",
        "failure midway through attach",
        1,
    ),
    "test_set_coeff_keeps_to_the_specs_bounds_and_changes_nothing_on_refusal": ("runtime", "bad set_coeff values", 1),
    "test_a_layer_whose_parent_reads_its_weight_is_refused_by_name": ("runtime", "layers that cannot take a hook", 1),
    "test_another_layer_kind_is_refused_naming_layer_and_type": ("runtime", "layers that cannot take a hook", 1),
    "test_crop_on_a_tied_weight_is_refused_and_subtract_works": ("runtime", "crop on a tied weight", 1),
    "test_a_second_crop_on_a_cropped_layer_is_refused_naming_it": ("runtime", "crop on a tied weight", 1),
    "test_a_stray_state_dict_hook_is_refused_and_changes_nothing": (
        "runtime",
        "misuse of attach/detach/load/set_coeff",
        1,
    ),
    "test_save_refuses_an_adapter_held_in_two_dtypes": ("save", "adapter held in two dtypes", 1),
    "test_a_spec_without_a_route_is_refused_pointing_to_merge": ("deploy", "export of a spec with no PEFT route", 1),
    "test_export_refuses_a_scale_peft_cannot_represent": ("deploy", "export of a state PEFT cannot represent", 1),
    "test_export_refuses_inside_disabled_and_without_an_adapter": (
        "deploy",
        "export of a state PEFT cannot represent",
        2,
    ),
    "test_conv1d_export_is_refused_where_peft_has_no_conv1d_form": (
        "deploy",
        "export of a state PEFT cannot represent",
        1,
    ),
    "test_load_peft_refuses_an_unsupported_key_naming_it": ("deploy", "PEFT directories with unsupported keys", 1),
    "test_load_peft_refuses_a_config_value_of_the_wrong_json_type_naming_the_key": (
        "deploy",
        "PEFT configs with mistyped, out-of-range or unfitting values",
        1,
    ),
    "test_load_peft_refuses_a_value_out_of_range_naming_the_config_file_and_key": (
        "deploy",
        "PEFT configs with mistyped, out-of-range or unfitting values",
        1,
    ),
    "test_load_peft_refuses_hyperparameters_that_do_not_fit_a_layer_naming_it": (
        "deploy",
        "PEFT configs with mistyped, out-of-range or unfitting values",
        1,
    ),
    "test_merge_refuses_an_adapter_with_nan_tensors_leaving_the_model_unchanged": (
        "deploy",
        "non-finite adapter tensors at merge or export",
        1,
    ),
    "test_export_peft_refuses_nan_adapter_tensors_writing_nothing": (
        "deploy",
        "non-finite adapter tensors at merge or export",
        1,
    ),
    "test_a_typed_config_refuses_an_unknown_keyword_as_from_spec_does": ("runtime", "bad config values", 1),
    "test_fan_in_fan_out_on_a_linear_target_is_refused": ("deploy", "PEFT directories with unsupported keys", 1),
    "test_load_peft_refuses_pickle_weights": ("deploy", "PEFT directories with pickle or misshapen weights", 1),
    "test_load_peft_refuses_a_saved_base_weight_that_is_not_this_models": (
        "deploy",
        "PEFT directories with pickle or misshapen weights",
        1,
    ),
    "test_load_peft_names_a_peft_type_it_has_no_route_for": ("deploy", "PEFT directories with unsupported keys", 1),
    "test_a_custom_spec_peft_cannot_compute_is_refused_with_its_reason": (
        "deploy",
        "export of a spec with no PEFT route",
        1,
    ),
    "test_load_peft_refuses_a_misshapen_tensor": ("deploy", "PEFT directories with pickle or misshapen weights", 1),
    "test_merge_refuses_inside_disabled_leaving_the_model_adapted": ("deploy", "merge of a state it cannot fold", 1),
    "test_merge_refuses_a_quantized_target_naming_it": ("deploy", "merge of a state it cannot fold", 1),
    "test_merge_folds_every_active_adapter_and_refuses_an_inactive_one": (
        "deploy",
        "merge of a state it cannot fold",
        1,
    ),
    "test_scale_refuses_a_non_finite_value": ("deploy", "bad ll.scale values", 1),
}


def classify(nodeid: str) -> tuple[str, str, int] | None:
    """(area, class, inputs) for a bad-input test, None for the suite's other tests."""
    func, _, param = nodeid.split("::")[-1].partition("[")
    param = param.rstrip("]")
    if func == "test_bad_checkpoint_is_refused_in_one_line_and_changes_nothing":
        return ("checkpoint", param.split(":")[0], 1)
    if func == "test_bad_spec_message":
        cls = next((c for prefix, c in SPEC_FILE_CLASSES if param.startswith(prefix)), "spec semantics")
        return ("spec", cls, 1)
    return FUNCTIONS.get(func)


class Collector:
    """pytest plugin: the outcome of every test's call phase (or of a failed setup)."""

    def __init__(self):
        self.outcomes: dict[str, str] = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            self.outcomes[report.nodeid] = report.outcome


def table(outcomes: dict[str, str]) -> tuple[str, int]:
    """The markdown table and the number of inputs not cleanly refused."""
    rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for nodeid, outcome in outcomes.items():
        found = classify(nodeid)
        if found is None:
            continue
        area, cls, n = found
        rows[(area, cls)][0 if outcome == "passed" else 1] += n
    order = ["spec", "checkpoint", "save", "runtime", "deploy"]
    lines = ["| input | class of bad input | tried | clear refusal | other |", "|---|---|---:|---:|---:|"]
    total = [0, 0]
    for (area, cls), (ok, bad) in sorted(rows.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        lines.append(f"| {area} | {cls} | {ok + bad} | {ok} | {bad} |")
        total[0] += ok
        total[1] += bad
    lines.append(f"| all | | {sum(total)} | {total[0]} | {total[1]} |")
    return "\n".join(lines) + "\n", total[1]


def write_readme(text: str) -> None:
    readme = ROOT / "README.md"
    body = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(body):
        sys.exit(f"README.md has no {BEGIN} ... {END} block")
    readme.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}{END}", body), encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write-readme", action="store_true", help="replace the table in README.md")
    args = ap.parse_args()
    collector = Collector()
    pytest.main(
        ["-q", "-p", "no:cacheprovider", "-o", "addopts=", *[str(ROOT / f) for f in FILES]], plugins=[collector]
    )
    text, bad = table(collector.outcomes)
    print(text)
    if args.write_readme:
        write_readme(text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
