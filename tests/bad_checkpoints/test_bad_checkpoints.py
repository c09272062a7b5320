"""Bad checkpoints: every one is refused by ll.load with one CheckpointError line (or the error
type given) containing the expected fragment, runs no code, and leaves the model unchanged.

TABLE lists the cases by class; each builds its bad file in tmp_path from a good PiSSA
checkpoint (format 2, signed). Cases that edit the metadata or tensors re-sign the file with
checkpoint.digest (what someone crafting a file would do), so the check under test is reached
instead of the digest; the `damaged` class does not re-sign.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save as st_bytes

import lora_lite as ll
from conftest import assert_unchanged, attach_small, make_model, perturb, snapshot
from lora_lite import checkpoint
from lora_lite.checkpoint_schema import MAX_HEADER_BYTES, MAX_TENSORS, SCHEMA

Q = "model.layers.0.self_attn.q_proj"  # a PiSSA target of the tiny model (32 -> 32)
SPECS = Path(__file__).parents[2] / "specs"


# ---------------------------------------------------------------- building bad files


def split(path: Path) -> tuple[dict, dict, dict]:
    """(lora_lite metadata, raw tensor table {name: (dtype code, shape, bytes)}, other metadata)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    other = header.pop("__metadata__")
    meta = json.loads(other.pop("lora_lite"))
    data = raw[8 + n :]
    table = {k: (v["dtype"], v["shape"], data[v["data_offsets"][0] : v["data_offsets"][1]]) for k, v in header.items()}
    return meta, table, other


def tensors_of(table: dict) -> dict[str, torch.Tensor]:
    return {k: torch.frombuffer(bytearray(b), dtype=checkpoint.DTYPES[c]).reshape(s) for k, (c, s, b) in table.items()}


def write(path: Path, meta, tensors: dict, sign: bool = True, text: str | None = None) -> Path:
    """A safetensors file with `meta` as lora_lite metadata (re-signed unless sign=False)."""
    if sign and isinstance(meta, dict) and meta.get("format_version") == 2:
        meta["sha256"] = checkpoint.digest(meta, tensors)
    text = json.dumps(meta) if text is None else text
    path.write_bytes(st_bytes(tensors, metadata={"lora_lite": text}))
    return path


def edit_meta(fn: Callable[[dict], object], sign: bool = True):
    """A case maker: apply fn to the metadata (fn may return a replacement), write the file."""

    def make(good: Path, out: Path) -> Path:
        meta, table, _ = split(good)
        new = fn(meta)
        return write(out / "bad.safetensors", meta if new is None else new, tensors_of(table), sign)

    return make


def edit_tensors(fn: Callable[[dict], None]):
    def make(good: Path, out: Path) -> Path:
        meta, table, _ = split(good)
        tensors = tensors_of(table)
        fn(tensors)
        return write(out / "bad.safetensors", meta, tensors)

    return make


def raw_bytes(fn: Callable[[bytes], bytes], name: str = "bad.safetensors"):
    def make(good: Path, out: Path) -> Path:
        p = out / name
        p.write_bytes(fn(good.read_bytes()))
        return p

    return make


def header(entries: dict, data: bytes = b"", meta: dict | None = None) -> bytes:
    """Hand-made safetensors bytes: 8-byte length, JSON header, data."""
    h = dict(entries)
    if meta is not None:
        h["__metadata__"] = meta
    text = json.dumps(h).encode()
    return struct.pack("<Q", len(text)) + text + data


def at(meta: dict, parts: tuple):
    for p in parts:
        meta = meta[p]
    return meta


def setter(parts: tuple, value):
    def fn(meta):
        at(meta, parts[:-1])[parts[-1]] = value

    return fn


def deleter(parts: tuple):
    def fn(meta):
        del at(meta, parts[:-1])[parts[-1]]

    return fn


def flip(offset_from_end: int):
    def fn(raw: bytes) -> bytes:
        b = bytearray(raw)
        b[len(b) - offset_from_end] ^= 0x01
        return bytes(b)

    return fn


class Evil:
    """Unpickling this creates a marker file: the test fails if any load ran it."""

    def __reduce__(self):
        return (open, ("PICKLE_RAN", "w"))


def pickle_file(name: str, zip_format: bool = False):
    def make(good: Path, out: Path) -> Path:
        p = out / name
        if zip_format:
            torch.save({"x": Evil()}, p)
        else:
            p.write_bytes(pickle.dumps(Evil(), protocol=2))
        return p

    return make


def spec_text(fn: Callable[[str], str]):
    def change(meta):
        meta["spec"] = fn(meta["spec"])

    return edit_meta(change)


def path_of(parts: tuple) -> str:
    return checkpoint._jpath(parts)


# ---------------------------------------------------------------- the table


@dataclass
class Case:
    cls: str  # class of bad input (one row of the README's table)
    id: str
    make: Callable[[Path, Path], Path]
    fragment: str
    error: type = ll.CheckpointError
    model: Callable = make_model
    load_kw: dict | None = None


def key_paths() -> list[tuple]:
    """Every key a PiSSA checkpoint has: top level, config, one target, its hyperparameters."""
    cfg = ll.from_spec("pissa", r=2)
    target_keys = SCHEMA["properties"]["targets"]["additionalProperties"]["required"]
    paths = [(k,) for k in SCHEMA["required"] + ["sha256"]] + [("config", k) for k in cfg.to_dict()]
    paths += [("targets", Q, k) for k in target_keys]
    return paths + [("targets", Q, "hyperparameters", k) for k in cfg.hyperparameters()]


def mistype(parts: tuple):
    def fn(meta):
        value = at(meta, parts)
        at(meta, parts[:-1])[parts[-1]] = "x" if isinstance(value, (dict, list)) else {"x": 1}

    return fn


def key_cases() -> list[Case]:
    """One missing and one mistyped case for every key: the error names the key's path."""
    out = []
    for parts in key_paths():
        sign = parts != ("sha256",)  # re-signing would put the digest back
        out.append(Case("missing key", path_of(parts), edit_meta(deleter(parts), sign), path_of(parts) + ": missing"))
        out.append(Case("mistyped key", path_of(parts), edit_meta(mistype(parts), sign), path_of(parts) + ":"))
    return out


def value_cases() -> list[Case]:
    fp, hp, cf = ("targets", Q, "fingerprint"), ("targets", Q, "hyperparameters"), ("config",)
    C = lambda cls, id, parts, value, frag: Case(cls, id, edit_meta(setter(parts, value), parts[0] != "sha256"), frag)  # noqa: E731
    return [
        C("non-finite number", "fingerprint NaN", fp + (2,), float("nan"), "fingerprint[2]: nan is not a finite"),
        C("non-finite number", "fingerprint inf", fp + (0,), float("inf"), "fingerprint[0]: inf is not a finite"),
        C("non-finite number", "alpha NaN", cf + ("alpha",), float("nan"), "$.config.alpha: nan is not a finite"),
        C("non-finite number", "alpha -inf", hp + ("alpha",), float("-inf"), "hyperparameters.alpha: -inf is not"),
        C("fingerprint length", "8 entries", fp, [1.0] * 8, "fingerprint: has 8, expected at least 9"),
        C("fingerprint length", "10 entries", fp, [1.0] * 10, "fingerprint: has 10, expected at most 9"),
        C("fingerprint length", "empty", fp, [], "fingerprint: has 0, expected at least 9"),
        C("fingerprint value", "1e308 norm", fp + (0,), 1e308, "base weight differs from the one the adapter was"),
        C("fingerprint length", "negative norm", fp + (0,), -1.0, "fingerprint[0]: -1.0 is below the minimum 0"),
        C("empty or mistyped targets", "empty targets", ("targets",), {}, "$.targets: has 0, expected at least 1"),
        C("empty or mistyped targets", "targets a list", ("targets",), [Q], "$.targets: expected object"),
        C("out-of-bounds hyperparameter", "config r=0", cf + ("r",), 0, "$.config.r: pissa.r=0 is below its minimum"),
        C("out-of-bounds hyperparameter", "config r=-3", cf + ("r",), -3, "$.config.r:"),
        C("out-of-bounds hyperparameter", "config r bool", cf + ("r",), True, "$.config.r: pissa.r: expected int"),
        C("out-of-bounds hyperparameter", "config r float", cf + ("r",), 2.5, "$.config.r: pissa.r: expected int"),
        C("out-of-bounds hyperparameter", "target r=0", hp + ("r",), 0, f"{path_of(hp)}.r: pissa.r=0 is below"),
        C("out-of-bounds hyperparameter", "target r > d", hp + ("r",), 33, "r: 33 exceeds min(d_in, d_out) = 32"),
        C("out-of-bounds hyperparameter", "target r huge", hp + ("r",), 2**40, "is above its maximum 65536"),
        C("out-of-bounds hyperparameter", "target r above layer", hp + ("r",), 1000, "exceeds min(d_in, d_out)"),
        C("unknown key", "config key", cf + ("beta",), 1.0, "$.config.beta: unknown key for pissa"),
        C("unknown key", "hyperparameter key", hp + ("beta",), 1.0, f"{path_of(hp)}.beta: unknown key"),
        C("unknown key", "top-level key", ("extra",), 1, "$.extra: unexpected key"),
        C("unknown key", "target key", ("targets", Q, "extra"), 1, f"{path_of(('targets', Q))}.extra: unexpected"),
        C("bad dtype name", "float8", cf + ("dtype",), "float8", "$.config.dtype: 'float8' is not one of"),
        C("bad dtype name", "int8", cf + ("dtype",), "int8", "$.config.dtype: 'int8' is not one of"),
        C("bad dtype name", "torch.float32", cf + ("dtype",), "torch.float32", "$.config.dtype:"),
        C(
            "bad dtype name",
            "weight_dtype",
            ("targets", Q, "weight_dtype"),
            "float32\nx",
            "weight_dtype: control character '\\n'",
        ),
        C("bad residual", "sideways", cf + ("residual",), "sideways", "$.config.residual: 'sideways' is not one"),
        C("bad residual", "none for pissa", cf + ("residual",), "none", "$.config.residual:"),
        C("bad config value", "target_names empty", cf + ("target_names",), [], "target_names: has 0"),
        C("bad config value", "target_names regex", cf + ("target_names",), ["(("], "target_names[0]: bad regex"),
        C("bad config value", "target_names ''", cf + ("target_names",), [""], "target_names[0]: has 0"),
        C("bad config value", "layers -1", cf + ("layers",), [-1], "layers[0]: -1 is below the minimum 0"),
        C("bad config value", "layers str", cf + ("layers",), ["0"], "layers[0]: expected integer"),
        C("bad target value", "d_in 0", ("targets", Q, "d_in"), 0, "d_in: 0 is below the minimum 1"),
        C("bad target value", "d_in 2**40", ("targets", Q, "d_in"), 2**40, "d_in: 1099511627776 is above"),
        C("bad target value", "weight_shape", ("targets", Q, "weight_shape"), [32, 33], "model layer is"),
        C("bad target value", "quantization", ("targets", Q, "quantization"), "nf4; rm -rf", "quantization:"),
        C("bad target value", "loaded distance", ("targets", Q, "loaded_fingerprint_distance"), -1, "below"),
        C("bad target value", "scale NaN", ("targets", Q, "scale"), float("nan"), "scale: nan is not a finite"),
        C("bad target value", "scale inf", ("targets", Q, "scale"), float("inf"), "scale: inf is not a finite"),
        C("bad target value", "scale bool", ("targets", Q, "scale"), True, "scale: expected number, got True"),
        C("bad target value", "scale string", ("targets", Q, "scale"), "0.5", "scale: expected number, got '0.5'"),
        Case(
            "bad digest",
            "scale changed after save",
            edit_meta(setter(("targets", Q, "scale"), 0.5), sign=False),
            "$.sha256: digest mismatch",
        ),
        C("bad target name", "space", ("targets", "a b"), {}, "$.targets: key 'a b' is not a valid name"),
        C("bad target name", "newline", ("targets", "a\nb"), {}, "$.targets: key 'a\\nb' has a control character"),
        C("bad target name", "empty", ("targets", ""), {}, "key '' is not a valid name"),
        C("bad target name", "U+2028", ("targets", "a\u2028b"), {}, "has a control character"),
        C("bad target name", "dots only", ("targets", ".."), {}, "is not a valid name"),
        C("bad spec name", "path", ("spec_name",), "../../x", "$.spec_name: '../../x' does not match"),
        C("bad spec name", "other spec", ("spec_name",), "lora", "$.spec: <checkpoint spec lora>"),
        C("bad version string", "newline", ("lora_lite_version",), "0.1\nimport os", "$.lora_lite_version: control"),
        C("format version", "future", ("format_version",), 3, "$.format_version: 3 is newer than this lora-lite"),
        C("format version", "zero", ("format_version",), 0, "$.format_version: 0 is not a format"),
        C("format version", "string", ("format_version",), "2", "$.format_version: '2' is not a format"),
        C("format version", "bool", ("format_version",), True, "$.format_version: True is not a format"),
        C("format version", "float", ("format_version",), 2.0, "$.format_version: 2.0 is not a format"),
        C("bad digest", "not hex", ("sha256",), "z" * 64, "$.sha256: 'zzzz"),
        C("bad digest", "short", ("sha256",), "ab", "$.sha256: 'ab' is not a sha256"),
    ]


def json_cases() -> list[Case]:
    def text(t: str):
        def make(good: Path, out: Path) -> Path:
            _, table, _ = split(good)
            return write(out / "bad.safetensors", None, tensors_of(table), text=t)

        return make

    def huge_alpha(good: Path, out: Path) -> Path:  # 1e400 parses as inf in Python's json
        meta, table, _ = split(good)
        meta["config"]["alpha"] = float("inf")
        meta["sha256"] = checkpoint.digest(meta, tensors_of(table))
        t = json.dumps(meta).replace("Infinity", "1e400", 1)
        return write(out / "bad.safetensors", None, tensors_of(table), text=t)

    def deep(good: Path, out: Path) -> Path:
        meta, table, _ = split(good)
        meta["config"]["alpha"] = json.loads("[" * 30 + "]" * 30)
        return write(out / "bad.safetensors", meta, tensors_of(table))

    def duplicate(good: Path, out: Path) -> Path:
        meta, table, _ = split(good)
        t = json.dumps(meta).replace('"config": {', '"config": {"r": 4, ', 1)
        return write(out / "bad.safetensors", None, tensors_of(table), text=t)

    return [
        Case("bad JSON", "not JSON", text("{not json"), "lora_lite metadata is not valid JSON"),
        Case("bad JSON", "truncated JSON", text('{"format_version": 2, "spec": "x'), "is not valid JSON"),
        Case("bad JSON", "array", text("[1, 2]"), "expected a JSON object, got list"),
        Case("bad JSON", "null", text("null"), "expected a JSON object, got NoneType"),
        Case("bad JSON", "recursion bomb", text("[" * 100000 + "]" * 100000), "nested too deeply"),
        Case("bad JSON", "deep but parseable", deep, "nested too deeply"),
        Case("bad JSON", "4301-digit int", text('{"format_version": ' + "9" * 4301 + "}"), "is not valid JSON"),
        Case("bad JSON", "duplicate key", duplicate, "duplicate key 'r'"),
        Case("bad JSON", "lone surrogate, no version", text('{"spec": "\\ud800"}'), "$.format_version: missing"),
        Case("non-finite number", "alpha 1e400", huge_alpha, "$.config.alpha: inf is not a finite number"),
        Case(
            "missing metadata", "no lora_lite key", raw_bytes(lambda r: st_bytes({"x": torch.zeros(2)})), "no lora_lite"
        ),
    ]


def file_cases() -> list[Case]:
    def cut(n):
        return raw_bytes(lambda r: r[:n] if n >= 0 else r[:n])

    def hdr_len(r: bytes) -> int:
        return struct.unpack("<Q", r[:8])[0]

    def huge_header(good: Path, out: Path) -> Path:
        p = out / "bad.safetensors"
        p.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 8) + b"{" + b" " * (MAX_HEADER_BYTES + 7))
        return p

    def many_tensors(good: Path, out: Path) -> Path:
        entries = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(MAX_TENSORS + 1)}
        p = out / "bad.safetensors"
        p.write_bytes(header(entries, meta={"lora_lite": "{}"}))
        return p

    def table(entries: dict, data: bytes = b"\0" * 8):
        return raw_bytes(lambda r: header(entries, data, meta={"lora_lite": "{}"}))

    f32 = lambda off, shape=(2,): {"dtype": "F32", "shape": list(shape), "data_offsets": list(off)}  # noqa: E731

    def special(kind: str):
        def make(good: Path, out: Path) -> Path:
            p = out / "bad.safetensors"
            if kind == "dir":
                p.mkdir()
            elif kind == "fifo":
                os.mkfifo(p)
            elif kind == "device":
                p.symlink_to("/dev/zero")
            return p  # "missing": never created

        return make

    return [
        Case("truncated file", "empty", cut(0), "0 bytes, shorter than a safetensors header"),
        Case("truncated file", "4 bytes", cut(4), "4 bytes, shorter than a safetensors header"),
        Case("truncated file", "mid-header", raw_bytes(lambda r: r[: 8 + hdr_len(r) // 2]), "or truncated: header"),
        Case("truncated file", "mid-data", raw_bytes(lambda r: r[: (len(r) + 8 + hdr_len(r)) // 2]), "truncated"),
        Case("truncated file", "last byte", cut(-1), "truncated or padded"),
        Case("truncated file", "bytes appended", raw_bytes(lambda r: r + b"\0" * 16), "truncated or padded"),
        Case(
            "damaged file", "tensor byte flipped", raw_bytes(flip(1)), "$.sha256: digest mismatch: the file is damaged"
        ),
        Case("damaged file", "first tensor byte", raw_bytes(lambda r: flip(len(r) - 8 - hdr_len(r))(r)), "damaged"),
        Case(
            "damaged file",
            "metadata digit changed",
            raw_bytes(lambda r: r.replace(b'\\"alpha\\": 16.0', b'\\"alpha\\": 17.0', 1)),
            "digest mismatch",
        ),
        Case(
            "damaged file",
            "spec text changed",
            raw_bytes(lambda r: r.replace(b"s = alpha / r", b"s = alpha * r", 1)),
            "digest mismatch",
        ),
        Case("damaged file", "header byte flipped", raw_bytes(lambda r: r[:9] + b"!" + r[10:]), "is not valid JSON"),
        Case("damaged file", "unsigned edit", edit_meta(setter(("config", "alpha"), 1.0), sign=False), "damaged"),
        Case("huge metadata", "header length 2**62", raw_bytes(lambda r: struct.pack("<Q", 2**62) + r[8:]), "exceeds"),
        Case("huge metadata", "header over the limit", huge_header, f"exceeds the {MAX_HEADER_BYTES}-byte limit"),
        Case("huge metadata", "too many tensors", many_tensors, f"tensors exceed the limit of {MAX_TENSORS}"),
        Case("huge metadata", "spec text 1 MiB", edit_meta(setter(("spec",), "#" * (1 << 20))), "$.spec: has 1048576"),
        Case("bad tensor table", "offsets overlap", table({"a": f32((0, 8)), "b": f32((4, 12))}), "do not tile"),
        Case("bad tensor table", "offsets past end", table({"a": f32((0, 8)), "b": f32((8, 16))}), "truncated or pad"),
        Case("bad tensor table", "size mismatch", table({"a": f32((0, 8), (3,))}), "do not tile the data"),
        Case("bad tensor table", "negative shape", table({"a": f32((0, 8), (-2,))}), "bad shape"),
        Case("bad tensor table", "int dtype", table({"a": {**f32((0, 8)), "dtype": "I64"}}), "'I64' is not one"),
        Case("bad tensor table", "extra field", table({"a": {**f32((0, 8)), "x": 1}}), "is not {dtype, shape"),
        Case("bad tensor table", "entry not object", table({"a": [1]}), "is not {dtype, shape"),
        Case("bad tensor table", "header not UTF-8", raw_bytes(lambda r: struct.pack("<Q", 5) + b'{"\xff"}'), "utf-8"),
        Case("bad tensor table", "metadata not strings", raw_bytes(lambda r: header({}, meta={"a": 1})), "map of str"),
        Case(
            "pickle file", ".bin", pickle_file("adapter.bin"), "a pickle file (.bin); lora-lite reads only safetensors"
        ),
        Case("pickle file", ".pt", pickle_file("adapter.pt", zip_format=True), "a pickle file (.pt)"),
        Case("pickle file", ".pth", pickle_file("adapter.pth", zip_format=True), "a pickle file (.pth)"),
        Case("pickle file", ".pkl", pickle_file("adapter.pkl"), "a pickle file (.pkl)"),
        Case("pickle file", ".ckpt", pickle_file("adapter.ckpt"), "a pickle file (.ckpt)"),
        Case("pickle file", ".PT upper case", pickle_file("adapter.PT"), "a pickle file (.PT)"),
        Case("pickle file", "pickle as .safetensors", pickle_file("p.safetensors"), "(a zip or pickle, as torch.save"),
        Case("pickle file", "zip as .safetensors", pickle_file("z.safetensors", True), "(a zip or pickle, as torch"),
        Case("not safetensors", "text", raw_bytes(lambda r: b"hello, this is text\n" * 10), "not a safetensors file"),
        Case("not safetensors", "PNG", raw_bytes(lambda r: b"\x89PNG\r\n\x1a\n" + b"\0" * 64), "not a safetensors"),
        Case("not safetensors", "JSON file", raw_bytes(lambda r: b'{"lora_lite": 1}' * 4), "not a safetensors file"),
        Case(
            "not safetensors", "header not an object", raw_bytes(lambda r: struct.pack("<Q", 2) + b"[]"), "not a JSON"
        ),
        Case("not safetensors", "directory", special("dir"), "not a regular file"),
        Case("not safetensors", "missing file", special("missing"), "cannot read: No such file or directory"),
        Case("not safetensors", "FIFO", special("fifo"), "not a regular file"),
        Case("not safetensors", "symlink to /dev/zero", special("device"), "not a regular file"),
    ]


def tensor_cases() -> list[Case]:
    A = f"{Q}.lora_A"

    def set_(key, value):
        def fn(t):
            t[key] = value

        return fn

    def nan(key, value):
        def fn(t):
            t[key] = t[key].clone()
            t[key][0, 0] = value

        return fn

    return [
        Case("wrong tensor dtype", "float16", edit_tensors(set_(A, torch.zeros(2, 32, dtype=torch.float16))), "is F16"),
        Case("wrong tensor dtype", "bfloat16", edit_tensors(set_(A, torch.zeros(2, 32, dtype=torch.bfloat16))), "BF16"),
        Case("wrong tensor dtype", "float64", edit_tensors(set_(A, torch.zeros(2, 32, dtype=torch.float64))), "is F64"),
        Case("wrong tensor shape", "transposed", edit_tensors(set_(A, torch.zeros(32, 2))), "has shape (32, 2), spec"),
        Case("wrong tensor shape", "rank 3", edit_tensors(set_(A, torch.zeros(3, 32))), "has shape (3, 32)"),
        Case("wrong tensor shape", "1-d", edit_tensors(set_(A, torch.zeros(64))), "has shape (64,)"),
        Case("missing tensor", "lora_A", edit_tensors(lambda t: t.pop(A)), f"tensor '{A}': missing"),
        Case("missing tensor", "frozen lora_B0", edit_tensors(lambda t: t.pop(f"{Q}.lora_B0")), "lora_B0': missing"),
        Case("extra tensor", "on a target", edit_tensors(set_(f"{Q}.lora_C", torch.zeros(2))), "is not a tensor of"),
        Case("extra tensor", "no target", edit_tensors(set_("evil.weight", torch.zeros(2))), "belongs to no target"),
        Case("extra tensor", "no dot", edit_tensors(set_("evil", torch.zeros(2))), "belongs to no target"),
        Case("non-finite tensor", "NaN", edit_tensors(nan(A, float("nan"))), f"tensor '{A}': holds NaN/inf values"),
        Case("non-finite tensor", "inf", edit_tensors(nan(A, float("inf"))), "holds NaN/inf values"),
        Case("non-finite tensor", "frozen buffer", edit_tensors(nan(f"{Q}.lora_B0", float("nan"))), "lora_B0': holds"),
    ]


def spec_cases() -> list[Case]:
    def once(s: str, old: str, new: str) -> str:
        assert old in s, f"the case's anchor {old!r} is not in the spec text"  # else the case tries nothing
        return s.replace(old, new, 1)

    sub = lambda old, new: spec_text(lambda s: once(s, old, new))  # noqa: E731
    return [
        Case("bad spec text", "not YAML", spec_text(lambda s: "{{{: ["), "$.spec: <checkpoint spec pissa>"),
        Case("bad spec text", "empty", spec_text(lambda s: " "), "$.spec:"),
        Case("bad spec text", "a list", spec_text(lambda s: "[1, 2]"), "$.spec: <checkpoint spec pissa>: $:"),
        Case("bad spec text", "another spec", spec_text(lambda s: (SPECS / "lora.yaml").read_text()), "$.spec:"),
        Case("bad spec text", "unknown key", sub("quantized_base: true", "quantized_base: true\nexec: 1"), "exec"),
        Case("spec injection", "triple quotes", sub("summary: ", 'summary: "x\\"\\"\\"\\nimport os\\n" #'), "$.spec:"),
        Case("spec injection", "hyperparameter name", sub("  alpha: {", '  "os.system(1)": {}\n  alpha: {'), "$.spec:"),
        Case("spec injection", "param name", sub("  lora_B: {", '  "lora_B; import os": {}\n  lora_B: {'), "$.spec:"),
        Case("spec injection", "name", sub("name: pissa", "name: 'pissa\\nimport os'"), "$.spec:"),
        Case("spec injection", "regex quote", sub(r"'\.q_proj$'", "'\\\"\"); import os #'"), "bad regex"),
        Case("spec injection", "backslash", sub("identity: |\n", "identity: |\n  \\N{x}\\n\n"), "$.spec:"),
        Case(
            "spec injection",
            "shape expression",
            sub("shape: [r, d_in]", "shape: [__import__('os'), d_in]"),
            "$.params.lora_A.shape[0]: ",
        ),
        Case("spec injection", "default", sub("default: 8,", "default: '__import__(\"os\")',"), "$.spec:"),
        Case(
            "spec injection", "python tag", sub("title: PiSSA", "title: !!python/object/apply:os.system [x]"), "$.spec"
        ),
    ]


def model_cases() -> list[Case]:
    same = lambda good, out: good  # noqa: E731

    def attached():
        m = make_model()
        ll.attach(m, ll.LoRAConfig(r=2))
        return m

    def peft_wrapped():
        m = make_model()
        m.model.layers[0].self_attn.q_proj.lora_A = torch.nn.ModuleDict()  # as PEFT's LoraLayer has
        return m

    def shared_weight():
        m = make_model()
        m.model.layers[1].self_attn.q_proj.weight = m.model.layers[0].self_attn.q_proj.weight
        return m

    def same_fingerprint(meta):  # saved from a model whose layer 1 q_proj shares layer 0's weight
        t = meta["targets"]
        t["model.layers.1.self_attn.q_proj"]["fingerprint"] = t[Q]["fingerprint"]

    fit = "model does not fit"
    return [
        Case(
            fit,
            "missing layer",
            same,
            "target 'model.layers.1.self_attn.q_proj' is missing from this model",
            model=lambda: make_model(n_layers=1),
        ),
        Case(fit, "wider", same, "model layer is (d_out, d_in) = (48, 48)", model=lambda: make_model(d=48)),
        Case(fit, "other weights", same, "base weight differs", model=lambda: make_model(seed=5)),
        Case(fit, "already attached", same, "already has a lora adapter", ll.AttachError, model=attached),
        Case(
            fit,
            "PEFT-wrapped layer",
            same,
            f"{Q} already has a child module (ModuleDict) named 'lora_A'",
            ll.AttachError,
            model=peft_wrapped,
        ),
        Case(
            fit,
            "crop of a shared weight",
            edit_meta(same_fingerprint),
            "shares its storage with",
            ll.AttachError,
            model=shared_weight,
        ),
        Case(
            fit,
            "bad residual argument",
            same,
            "residual: 'sideways' is not one of",
            ValueError,
            load_kw={"residual": "sideways"},
        ),
    ]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    model = make_model()
    attach_small(model, "pissa", r=2)
    perturb(model)
    return ll.save(model, tmp_path_factory.mktemp("good") / "good.safetensors")


TABLE: list[Case] = [
    *file_cases(),
    *json_cases(),
    *key_cases(),
    *value_cases(),
    *tensor_cases(),
    *spec_cases(),
    *model_cases(),
]


def modes(model) -> dict:
    return {n: m.training for n, m in model.named_modules()}


@pytest.mark.parametrize("case", TABLE, ids=[f"{c.cls}: {c.id}" for c in TABLE])
def test_bad_checkpoint_is_refused_in_one_line_and_changes_nothing(case, good, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # where an executed payload would leave its marker
    bad = case.make(good, tmp_path)
    model = case.model()
    model.model.layers[0].train()  # mixed train/eval modes: load must leave each as it is
    snap, before, st = snapshot(model), modes(model), ll.state(model)
    with pytest.raises(case.error) as info:
        ll.load(model, bad, **(case.load_kw or {}))
    msg = str(info.value)
    assert len(msg.splitlines()) == 1, msg
    assert case.fragment in msg, msg
    if case.error is ll.CheckpointError:
        assert msg.startswith(f"{bad}: "), msg
    assert not (tmp_path / "PICKLE_RAN").exists()
    assert modes(model) == before
    if st is None:
        assert_unchanged(model, snap)
    else:  # already attached: the first adapter stays as it was
        assert ll.state(model) is st and all(torch.equal(v, snap[0][k]) for k, v in model.state_dict().items())


def test_every_case_is_named_once():  # pytest would quietly rename a duplicate id
    assert len({(c.cls, c.id) for c in TABLE}) == len(TABLE)


def test_models_load_cannot_adapt_are_refused_unchanged(good):
    """Layers with a leftover lora-lite hook or meta weights, and inference mode: AttachError."""
    from lora_lite.runtime import OutputHook

    hooked = make_model()
    q = hooked.model.layers[0].self_attn.q_proj
    q.register_forward_hook(OutputHook(None))  # left by an attach that failed half-way
    meta = make_model()
    meta.model.layers[1].self_attn.v_proj.weight = torch.nn.Parameter(torch.empty(16, 32, device="meta"))
    plain = make_model()
    for model, fragment, ctx in [
        (hooked, f"{Q} has a lora-lite hook", torch.enable_grad),
        (meta, "model.layers.1.self_attn.v_proj: weight is on the meta device", torch.enable_grad),
        (plain, "load: refused under torch.inference_mode", torch.inference_mode),
    ]:
        real = {k: v for k, v in model.state_dict().items() if not v.is_meta}
        snap = ({k: v.clone() for k, v in real.items()}, modes(model), len(q._forward_hooks))
        with pytest.raises(ll.AttachError, match=fragment), ctx():
            ll.load(model, good)
        assert ll.state(model) is None and modes(model) == snap[1] and len(q._forward_hooks) == snap[2]
        assert all(torch.equal(v, snap[0][k]) for k, v in model.state_dict().items() if not v.is_meta)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters()}
