"""Self-describing adapter checkpoints: safetensors tensors + JSON metadata.

File layout (one safetensors file, format 2):
    tensors   "<target module name>.<tensor name>" -> adapter tensor (trainable and frozen),
              all in the adapter dtype (config.dtype: the dtype the tensors are held in when
              saved, so an adapter moved with model.to(bfloat16) saves as bfloat16)
    metadata  {"lora_lite": JSON} with format_version, spec name and YAML text (so a custom
              spec reloads anywhere), config (hyperparameters, targets, dtype), per target:
              its own hyperparameters (clamped rank), base weight shape/dtype/quantization and a
              fingerprint of the original (pre-crop, dequantized) weight; and sha256, a digest of
              the rest of the metadata and of every tensor (`digest`). Format 1 (lora-lite 0.1.0)
              is the same without sha256 and still loads.

Only safetensors files are read, by this module's own reader (no pickle, no torch.load). load
validates before it uses anything: file structure and size limits, the digest, the metadata
against checkpoint_schema.SCHEMA, the spec text through the spec compiler, hyperparameters
through the variant's Config, every tensor's name, dtype, shape and finiteness, and the model's
layers (shape, weight fingerprint). Every refusal is one CheckpointError line,
`path: $.key.path: message` or `path: tensor 'name': message`, and leaves the model unchanged.

load() needs no calibration data: cropped variants rebuild W_res from the saved basis.
A checkpoint saved on a float base loads onto a bitsandbytes 4/8-bit one and the reverse
(residual crop needs load(..., residual="subtract") on a quantized base); each target's
metadata then says what the adapter was trained on (loaded_from_quantization).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import secrets
import stat
import struct
import warnings
from pathlib import Path

import jsonschema
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from . import __version__
from .checkpoint_schema import MAX_HEADER_BYTES, MAX_TENSORS, SCHEMA
from .codegen import SpecError
from .config import dtype_name
from .registry import shipped_names, spec_text, variant_from_text, variant_module
from .runtime import (
    AttachError,
    base_weight,
    check_model,
    check_name,
    check_quantized,
    fingerprint_distance,
    install,
    is_embedding,
    is_linear_like,
    layer_dims,
    preflight,
    rank_limit,
    shared_shapes,
    state,
    states,
    target_info,
    warn_if_wrapped_already,
)
from .wrappers import full, is_writer, unwrap

try:  # POSIX: a save holds an advisory lock on its temporary file (see save)
    import fcntl
except ImportError:  # pragma: no cover (Windows: no locks, so stale temporary files are left alone)
    fcntl = None

FORMAT_VERSION = 2
SHARED_PREFIX = "shared."  # a variant's SHARED tensors (VeRA's A, B) are stored once, as shared.<tensor name>
READS = (1, 2)  # format versions this lora-lite loads
FINGERPRINT_TOL = 0.05  # relative; rounding W to bf16 moves it by ~0.1%, to fp16 by ~0.02%
# fingerprint_distance estimates the relative weight change. Measured with bitsandbytes 0.50
# (scripts/fingerprint_quant.py: Gaussian, kaiming-uniform and Student-t weights, 64x64 to
# 512x1024, 5 seeds each), float vs quantized, median / max: int8 0.007 / 0.04, nf4 0.095 / 0.18,
# fp4 0.13 / 0.31 (heavy-tailed weights, 19% weight error); unrelated weights of the same shape
# 1.4 / min 0.55. 0.4 admits every 4-bit case seen with room for the estimate's noise (k = 8
# projections); a random unrelated weight falls below it about 3 times in 10,000. It cannot
# tell a base from a light fine-tune of it: quantization moves W more than such a tune does.
FINGERPRINT_TOL_QUANT = 0.4
STRICT_RESIDUALS = ("crop", "subtract")  # math depends on W: a mismatch is an error, not a warning
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # torch.save / pickle: can run code
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
CODES = {v: k for k, v in DTYPES.items()}
DTYPES_BY_NAME = {dtype_name(t): t for t in DTYPES.values()}
# sha256 of the YAML text of each spec shipped with lora-lite 0.1.0 (carried by format-1
# checkpoints): such a checkpoint loads with today's shipped module of that name, without
# compiling its text (which a stricter spec schema may no longer accept).
FORMAT_1_SPECS = {
    "antipasto": "fd1ff1f4d87899a42745c1a00ff647cfbfac6d38f6602eed55fb0bb35b11988b",
    "antipasto_ablate": "4e29a9d081f02f2a8d4d8dbee8a2327d32b70b6ebaab041b3379bbc96195e267",
    "antipasto_arrow": "03864f74a912b87b835c6731a016cb1d7a92e3ea2b703a07ea17267d6d80a0c5",
    "antipasto_corda": "f3d5d80abea3b65a5156aaaa0a93006dca7bf100336fb264b7f9a9ec2ff44174",
    "corda_arrow": "ad603a600c7aa1d64e0a350d01c6d8508f7b751a619e79bb83b56c7e86ad262e",
    "delora": "9e02b1927a6e22a74aa0113140706b1e51668af10477e92446b57daa5922da8e",
    "dora": "422f7e8486a0d997a5b499089c75e4123b8363b32644e39f2bc0ff5c78245178",
    "eva": "babd5df971e62fcb135ce9ca84a7c5ca2ce2e3af7982c5c539ca4b940fd42c08",
    "hra": "2564956659271e1e18a4f308a0f87a002f613f75ee7daf09844beded387fd213",
    "ia3": "a0f14eb7512d5bea14f6c40c6331b92d85c5ce9fd76fc825581740d7a7b6cd50",
    "ia3_ff": "fce620e2dd3afc27dd4e32b1247ca3b7b6e52e7386c6108648bdefd514166e61",
    "lora": "4cfc75c1a0c87ca52992bbe090403f4058a65b1b09055356db0a45ed882b0ee1",
    "pissa": "93e52c37c07e950701f664d7c11f0cf0a45971aace7cff3d008323a89fcab14b",
}
# sha256 of shipped spec texts whose tensor layout changed since, with the tensors to read in
# today's layout: {tensor: size-1 axes to put in front}. Such a checkpoint loads with today's
# shipped module of that name (as FORMAT_1_SPECS); its tensors keep their values and order.
# boft before butterfly factors >= 2: lora_boft_R (n, b, b) is the one factor of (1, n, b, b).
RELAYOUT_SPECS = {
    "891ecc090df83a7d4c558af430f1651daeb0996fc7f3916bd2359dcf0c0f4508": ("boft", {"lora_boft_R": 1}),
}
_CONTROLS = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
_ESCAPES = {c: repr(chr(c))[1:-1] for c in _CONTROLS if c != 0x09}  # line breaks and other controls
_MAX_DEPTH = 16  # the metadata is 5 levels deep


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not fit the model; the model was left unchanged."""


def _err(path, where: str | None, msg: str) -> CheckpointError:
    """`path: where: msg` as one line (control characters from names or files are escaped)."""
    text = f"{path}: {where}: {msg}" if where else f"{path}: {msg}"
    return CheckpointError(text.translate(_ESCAPES))


def _jpath(parts) -> str:
    """JSON path of a metadata key: $.targets.model.layers.0.q_proj.fingerprint[3]."""
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}" if re.fullmatch(r"[\w.-]+", str(p)) else f"[{p!r}]"
    return out


def _short(value, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


# ---------------------------------------------------------------- digest


def _meta_bytes(meta: dict) -> bytes:
    """Canonical JSON of the metadata without its digest (the same bytes at save and at load)."""
    rest = {k: v for k, v in meta.items() if k != "sha256"}
    return json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _tensor_prefix(name: str, code: str, shape) -> bytes:
    return json.dumps([name, code, list(shape)], ensure_ascii=True).encode()


def digest(meta: dict, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 (hex) stored as metadata["sha256"] in format 2.

    Hashes the canonical JSON of `meta` without "sha256", then for each tensor in name order
    the JSON of [name, safetensors dtype code, shape] and its little-endian bytes as
    safetensors stores them. load recomputes it from the file while streaming the tensor
    bytes, so a changed byte anywhere (metadata or tensor) is refused as damage.
    """
    h = hashlib.sha256(_meta_bytes(meta))
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(_tensor_prefix(name, CODES[t.dtype], t.shape))
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ---------------------------------------------------------------- reading


def _not_a_file(path: Path, mode: int) -> str:
    """Why `path` (not a regular file) is no checkpoint; a directory points to what reads it."""
    if not stat.S_ISDIR(mode):
        return "not a regular file"
    if (path / "adapter_config.json").is_file():
        return (
            "a directory holding adapter_config.json (a PEFT adapter): attach it with ll.load_peft(model, dir); "
            "ll.load takes the .safetensors file ll.save wrote"
        )
    return "a directory, not a regular file: ll.load takes the .safetensors file ll.save wrote"


def as_path(value, op: str, arg: str = "path") -> Path:
    """`value` as a Path; CheckpointError naming the function, the argument and the type received
    when it is no str or os.PathLike (3, None: pathlib's TypeError named neither)."""
    if not isinstance(value, (str, os.PathLike)):
        got = f"{type(value).__name__} {_short(value)}".translate(_ESCAPES)
        raise CheckpointError(f"{op}: {arg} must be a str or os.PathLike path, got {got}")
    return Path(value)


class _File:
    """An open safetensors file whose header is read and checked; tensor bytes are read on demand.

    Checks: a regular file, not a pickle (by suffix or magic bytes), header length within
    MAX_HEADER_BYTES and the file, header JSON an object of str -> str metadata and at most
    MAX_TENSORS entries {dtype (a float code), shape, data_offsets} that tile the data exactly.
    """

    def __init__(self, path: Path):
        self.path = path
        if path.suffix.lower() in PICKLE_SUFFIXES:
            msg = f"a pickle file ({path.suffix}); lora-lite reads only safetensors (a pickle can run code)"
            raise _err(path, None, msg)
        try:  # O_NONBLOCK: a FIFO must not hang the open; regular files ignore it
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
            raise _err(path, None, f"cannot read: {getattr(e, 'strerror', None) or e}") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # a folder, FIFO, device: never read
            os.close(fd)
            raise _err(path, None, _not_a_file(path, mode))
        self.f = os.fdopen(fd, "rb")
        try:
            self._read_header()
        except BaseException:
            self.f.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def _read_header(self) -> None:
        path, f = self.path, self.f
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
        except OSError as e:
            raise _err(path, None, f"cannot read: {e.strerror or e}") from None
        not_st = "not a safetensors file"
        if head[:2] == b"PK" or head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            not_st += " (a zip or pickle, as torch.save writes; lora-lite reads only safetensors)"
        if len(head) < 8:
            raise _err(path, None, f"{not_st}: {size} bytes, shorter than a safetensors header")
        n = struct.unpack("<Q", head)[0]
        if n > MAX_HEADER_BYTES:
            raise _err(path, None, f"{not_st}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + n > size:
            raise _err(path, None, f"{not_st} or truncated: header of {n} bytes, file of {size}")
        try:
            raw = f.read(n)
        except OSError as e:
            raise _err(path, None, f"cannot read: {e.strerror or e}") from None
        if len(raw) != n or not raw.lstrip().startswith(b"{"):
            raise _err(path, None, f"{not_st}: the header is not a JSON object")
        header = _parse_json(raw, path, "safetensors header")
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise _err(path, None, f"{not_st}: __metadata__ is not a map of strings")
        if len(header) > MAX_TENSORS:
            raise _err(path, None, f"{len(header)} tensors exceed the limit of {MAX_TENSORS}")
        self.metadata, self.data_start, self.table = meta, 8 + n, {}
        data_len, end = size - 8 - n, 0
        for name, entry in sorted(header.items(), key=lambda kv: _offsets(kv[1])):
            code, shape, (b, e) = self._entry(name, entry)
            numel = math.prod(shape)
            if b != end or e - b != numel * DTYPES[code].itemsize:
                raise _err(
                    path, f"tensor {name!r}", f"data_offsets {[b, e]} do not tile the data for {code} {shape} (damaged)"
                )
            self.table[name] = (code, shape, b, e)
            end = e
        if end != data_len:
            raise _err(path, None, f"truncated or padded: tensors need {end} data bytes, the file has {data_len}")

    def _entry(self, name: str, entry) -> tuple[str, list[int], tuple[int, int]]:
        where = f"tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _err(self.path, where, "header entry is not {dtype, shape, data_offsets} (damaged)")
        code, shape, off = entry["dtype"], entry["shape"], entry["data_offsets"]
        if code not in DTYPES:
            raise _err(self.path, where, f"dtype {_short(code)} is not one lora-lite saves ({', '.join(DTYPES)})")
        ints = lambda xs: isinstance(xs, list) and all(type(x) is int and 0 <= x < 2**62 for x in xs)  # noqa: E731
        if not ints(shape) or len(shape) > 8 or not ints(off) or len(off) != 2:
            raise _err(self.path, where, f"bad shape {_short(shape)} or data_offsets {_short(off)} (damaged)")
        return code, shape, (off[0], off[1])

    def chunks(self, name: str, size: int = 1 << 20):
        """The tensor's bytes, in pieces of at most `size` (memory stays bounded)."""
        _, _, b, e = self.table[name]
        self.f.seek(self.data_start + b)
        left = e - b
        while left:
            try:
                piece = self.f.read(min(size, left))
            except OSError as e:
                raise _err(self.path, f"tensor {name!r}", f"cannot read: {e.strerror or e}") from None
            if not piece:
                raise _err(self.path, f"tensor {name!r}", "truncated (the file shrank while reading)")
            left -= len(piece)
            yield piece

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as a new CPU tensor of its file dtype and shape."""
        code, shape, b, e = self.table[name]
        buf = bytearray(e - b)
        view, at = memoryview(buf), 0
        for piece in self.chunks(name):
            view[at : at + len(piece)] = piece
            at += len(piece)
        flat = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        return flat.view(DTYPES[code]).reshape(shape)

    def digest(self, meta: dict) -> str:
        h = hashlib.sha256(_meta_bytes(meta))
        for name in sorted(self.table):
            code, shape, _, _ = self.table[name]
            h.update(_tensor_prefix(name, code, shape))
            for piece in self.chunks(name):
                h.update(piece)
        return h.hexdigest()


def _offsets(entry):
    off = entry.get("data_offsets") if isinstance(entry, dict) else None
    return tuple(x for x in off if type(x) is int) if isinstance(off, list) else ()


def _no_duplicates(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return out


def _parse_json(raw: bytes | str, path, what: str) -> dict:
    """A JSON object; CheckpointError for bad UTF-8/JSON, duplicate keys, deep nesting, huge ints."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        value = None
        msg = "nested too deeply"
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, duplicate keys, ints of > 4300 digits
        value = None
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    else:
        msg = None if isinstance(value, dict) else f"expected a JSON object, got {type(value).__name__}"
    if msg:
        raise _err(path, None, f"{what} is not valid JSON ({msg})")
    return value


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _scan(meta) -> tuple[tuple, str] | None:
    """(key path, message) for the first NaN/inf number, control character in a key or string
    (the spec text aside: the spec compiler judges it) or node deeper than _MAX_DEPTH, else None."""
    stack = [((), meta)]
    while stack:
        parts, v = stack.pop()
        if len(parts) > _MAX_DEPTH:
            return parts, "nested too deeply"
        if isinstance(v, float) and not math.isfinite(v):
            return parts, f"{v} is not a finite number"
        if isinstance(v, str) and parts != ("spec",) and _CONTROL.search(v):
            return parts, f"control character {_CONTROL.search(v).group()!r} in {_short(v)}"
        if isinstance(v, dict):
            for k in v:
                if _CONTROL.search(k):
                    return parts, f"key {_short(k)} has a control character"
            stack.extend((parts + (k,), x) for k, x in reversed(list(v.items())))
        elif isinstance(v, list):
            stack.extend((parts + (i,), x) for i, x in reversed(list(enumerate(v))))
    return None


def _schema_error(err: jsonschema.ValidationError) -> tuple[tuple, str]:
    """(key path, message) for a schema violation, naming the missing or unexpected key."""
    parts, v, inst = tuple(err.absolute_path), err.validator_value, err.instance
    if err.validator == "required":
        missing = next(k for k in v if k not in inst)
        return parts + (missing,), "missing"
    if err.validator == "additionalProperties" and v is False:
        extra = sorted(set(inst) - set(err.schema.get("properties", {})))
        return parts + (extra[0],), "unexpected key"
    if "propertyNames" in err.schema_path:
        return parts, f"key {_short(inst)} is not a valid name (letters, digits, _ and -, joined by dots)"
    size = len(inst) if isinstance(inst, (list, dict, str)) else None
    what = {"minItems": "at least {} items", "maxItems": "at most {} items", "minProperties": "at least {} entries"}
    what |= {"maxProperties": "at most {} entries", "minLength": "at least {} characters"}
    what |= {"maxLength": "at most {} characters"}
    if err.validator in what:
        return parts, f"has {size}, expected " + what[err.validator].format(v)
    if err.validator == "type":
        return parts, f"expected {' or '.join(v) if isinstance(v, list) else v}, got {_short(inst)}"
    if err.validator in ("enum", "const"):
        return parts, f"{_short(inst)} is not one of {v if isinstance(v, list) else [v]}"
    if err.validator in ("minimum", "maximum"):
        side = "below the minimum" if err.validator == "minimum" else "above the maximum"
        return parts, f"{_short(inst)} is {side} {v}"
    if err.validator == "pattern":
        return parts, f"{_short(inst)} does not match {v}"
    return parts, err.message[:200]


_VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def _metadata_problem(meta: dict) -> tuple[tuple, str] | None:
    """(key path, message) of the first problem _scan finds or schema violation, else None."""
    bad = _scan(meta)
    if bad:
        return bad
    err = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(meta))
    return _schema_error(err) if err is not None else None


def _check_metadata(ck: _File) -> dict:
    """The validated lora_lite metadata of an open checkpoint (see load for the order of checks)."""
    path = ck.path
    raw = ck.metadata.get("lora_lite")
    if raw is None:
        raise _err(path, None, "no lora_lite metadata (not saved by ll.save?)")
    meta = _parse_json(raw, path, "lora_lite metadata")
    if "format_version" not in meta:
        raise _err(path, "$.format_version", "missing")
    version = meta["format_version"]
    if type(version) is not int or version not in READS:
        if type(version) is int and version > max(READS):
            msg = f"{version} is newer than this lora-lite reads ({', '.join(map(str, READS))}); upgrade lora-lite"
        else:
            msg = f"{_short(version)} is not a format this lora-lite reads ({', '.join(map(str, READS))})"
        raise _err(path, "$.format_version", msg)
    if "sha256" in meta:  # format 2 always; checked before anything else reads the metadata
        want = meta["sha256"]
        if not isinstance(want, str) or not re.fullmatch(r"[0-9a-f]{64}", want):
            raise _err(path, "$.sha256", f"{_short(want)} is not a sha256 hex digest")
        if ck.digest(meta) != want:
            raise _err(path, "$.sha256", "digest mismatch: the file is damaged (metadata or tensor bytes changed)")
    problem = _metadata_problem(meta)
    if problem:
        raise _err(path, _jpath(problem[0]), problem[1])
    dtype = DTYPES_BY_NAME[meta["config"]["dtype"]]
    for name, (code, _, _, _) in ck.table.items():
        target = name.rsplit(".", 1)[0]
        one = target + "." == SHARED_PREFIX  # shared.<tensor>: checked against the spec's SHARED in load
        if "." not in name or not (one or target in meta["targets"]):
            raise _err(path, f"tensor {name!r}", "belongs to no target in $.targets (extra tensor)")
        if DTYPES[code] != dtype:
            msg = f"is {code}, the adapter dtype ($.config.dtype) is {dtype_name(dtype)}"
            raise _err(path, f"tensor {name!r}", msg)
    return meta


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's lora_lite metadata, validated (file, digest, schema; see load).

    Streams the tensor bytes once for the digest without keeping them. Raises CheckpointError.
    """
    with _File(as_path(path, "read_metadata")) as ck:
        return _check_metadata(ck)


def _variant(path, meta: dict):
    """The generated module for the checkpoint's spec: a shipped module for a spec text shipped
    with lora-lite 0.1.0, else the text compiled like a spec file (SpecError -> $.spec)."""
    name, text = meta["spec_name"], meta["spec"]
    sha = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    if (FORMAT_1_SPECS.get(name) == sha or RELAYOUT_SPECS.get(sha, ("",))[0] == name) and name in shipped_names():
        gen = variant_module(name)
        # a hyperparameter the shipped spec gained since (pissa's svd_niter) takes its default,
        # which keeps the old behaviour; the saved keys are checked as usual
        defaults = {f.name: f.default for f in dataclasses.fields(gen.Config) if f.name in gen.BOUNDS}
        for values in [meta["config"], *(t.get("hyperparameters") for t in meta["targets"].values())]:
            if isinstance(values, dict):
                values.update({k: v for k, v in defaults.items() if k not in values})
        return gen
    try:
        return variant_from_text(text, name)
    except SpecError as e:
        lines = str(e).splitlines() or [""]
        more = f" (and {len(lines) - 1} more problems)" if len(lines) > 1 else ""
        raise _err(path, "$.spec", lines[0] + more) from None
    except Exception as e:  # noqa: BLE001 (no other type may escape load; the spec text is untrusted data)
        raise _err(path, "$.spec", f"does not compile: {type(e).__name__}: {e}") from None


def _relayout(ck: _File, meta: dict) -> None:
    """Read a superseded layout's tensors (RELAYOUT_SPECS) in today's shape: the table's shape
    gains size-1 leading axes; the bytes, already checked against the digest, stay as stored."""
    sha = hashlib.sha256(meta["spec"].encode("utf-8", "surrogatepass")).hexdigest()
    _, axes = RELAYOUT_SPECS.get(sha, ("", {}))
    for key, (code, shape, b, e) in list(ck.table.items()):
        lead = axes.get(key.rsplit(".", 1)[-1], 0)
        if lead:
            ck.table[key] = (code, [1] * lead + list(shape), b, e)


def _config(path, gen, values: dict, where: tuple, keys) -> None:
    """Refuse unknown, missing or invalid keys of `values` (checked one at a time, so the error
    names the key) against the variant's Config. `keys`: the keys `values` must have."""
    for k in values:
        if k not in keys:
            raise _err(path, _jpath(where + (k,)), f"unknown key for {gen.NAME} (its keys: {', '.join(keys)})")
    for k in keys:
        if k not in values:
            raise _err(path, _jpath(where + (k,)), "missing")
        try:
            gen.Config(**{k: values[k]})
        except (ValueError, TypeError) as e:
            raise _err(path, _jpath(where + (k,)), str(e)) from None


def load(model: nn.Module, path: str | os.PathLike, *, residual: str | None = None, name: str = "default") -> nn.Module:
    """Attach the adapter saved at `path` to `model` (no calibration data needed); returns `model`.

    residual: None = as saved; "crop" or "subtract" switches a variant with a frozen part
    between the two (the same math: W_res x + adapter, or W x - frozen part + adapter), e.g.
    "subtract" to put an adapter trained with crop on a float base onto a 4/8-bit base.
    name: attach it as this adapter (see ll.attach); any checkpoint loads under any name. Each
    target's saved ll.scale comes back (1.0 when the file has none).

    Checks, in order, before changing anything (nothing runs from the file but the spec
    compiler's validated output): `name` an identifier with no adapter attached under it, not
    under torch.inference_mode; a
    safetensors file (never a pickle) within the size limits; format version 1 or 2; the sha256
    digest when present (format 2 always has one); no NaN/inf or control characters in the
    metadata; the metadata against checkpoint_schema.SCHEMA; every tensor in the adapter dtype
    and belonging to a target; the spec text compiles (SpecError -> `$.spec`); config and
    per-target hyperparameters are exactly the spec's keys within its bounds, ranks at most
    min(d_in, d_out), fitting the layer as attach requires (the variant's check: BOFT's factors
    dividing d_in, ...); every target exists, is linear-like and has the saved shape; a quantized
    target is supported (no crop); no target already has an attribute named like an adapter
    tensor, a lora-lite hook or meta weights; crop targets do not share a weight; each target
    has exactly the spec's tensors with the spec's shapes, finite; no target already cropped by
    another adapter when this one crops; the base weight's
    fingerprint matches within FINGERPRINT_TOL, or FINGERPRINT_TOL_QUANT when either side is
    quantized (an error for variants whose math depends on W, else a warning). Tensor bytes are
    read only after their shapes passed. Raises CheckpointError naming the file and key path or
    tensor, AttachError naming the layer (already attached, quantized target, a layer that
    cannot take the adapter), ValueError for a residual the variant does not take.
    `model` may be wrapped (torch.compile, DDP, accelerate, FSDP2); the wrapper is returned.
    """
    check_model(model, "load")
    wrapper, model = model, unwrap(model)
    check_name(name)
    path = as_path(path, "load")
    with _File(path) as ck:
        meta = _check_metadata(ck)
        gen = _variant(path, meta)
        _relayout(ck, meta)
        cfg = _load_config(path, gen, meta["config"], residual)
        modules = dict(model.named_modules())
        plans = {tname: _plan_target(ck, gen, cfg, tname, tm, modules) for tname, tm in meta["targets"].items()}
        preflight(model, cfg, {tname: plan[0] for tname, plan in plans.items()}, op="load", name=name)
        shared_want = _plan_shared(ck, gen, cfg, plans)
        known = {f"{tname}.{k}" for tname, p in plans.items() for k in p[2]} | set(shared_want)
        extra = sorted(set(ck.table) - known)
        if extra:
            raise _err(path, f"tensor {extra[0]!r}", f"is not a tensor of {gen.NAME} ({len(extra)} extra tensors)")
        strict = cfg.residual in STRICT_RESIDUALS or gen.USES_BASE_WEIGHT
        per_target = {tname: _read_target(ck, gen, tname, *plan, strict) for tname, plan in plans.items()}
        shared = {key.removeprefix(SHARED_PREFIX): _finite(ck, key) for key in shared_want}
    scales = {tname: float(tmeta.get("scale", 1.0)) for tname, tmeta in meta["targets"].items()}
    st = install(model, cfg, per_target, op="load", name=name, shared=shared)
    for tname, t in st.targets.items():
        t.scale = scales[tname]
    warn_if_wrapped_already(wrapper, "load")
    return wrapper


def _load_config(path: Path, gen, values: dict, residual: str | None):
    """The variant's Config from $.config (each key checked alone first, so errors name it)."""
    _config(path, gen, values, ("config",), [f.name for f in dataclasses.fields(gen.Config)])
    try:
        cfg = gen.Config(**values)
    except (ValueError, TypeError) as e:
        raise _err(path, "$.config", str(e)) from None
    for i, p in enumerate(cfg.target_names or ()):
        try:
            re.compile(p)
        except (re.error, RecursionError, OverflowError) as e:
            raise _err(path, _jpath(("config", "target_names", i)), f"bad regex: {e}") from None
    return cfg if residual is None else dataclasses.replace(cfg, residual=residual)


def _plan_target(ck: _File, gen, cfg, name: str, tmeta: dict, modules: dict) -> tuple:
    """(module, its config, {tensor: shape}, tmeta) for one saved target, checked against the
    model and the file's tensor table; reads no tensor bytes."""
    path, where = ck.path, ("targets", name)
    m = modules.get(name)
    if m is None or not (is_linear_like(m) or is_embedding(m)):
        what = "missing from" if m is None else "not linear-like in"
        raise _err(path, "$.targets", f"target {name!r} is {what} this model")
    d_in, d_out = layer_dims(m)
    shape = [d_out, d_in]
    if shape != [tmeta["d_out"], tmeta["d_in"]] or tmeta["weight_shape"] != shape:
        saved = (tmeta["d_out"], tmeta["d_in"])
        msg = f"model layer is (d_out, d_in) = {tuple(shape)}, checkpoint expects {saved}"
        raise _err(path, _jpath(where), msg + f" (weight_shape {tmeta['weight_shape']})")
    check_quantized(gen, cfg, name, m, fix="ll.load(model, path, residual='subtract')")
    hyper = tmeta["hyperparameters"]
    _config(path, gen, hyper, where + ("hyperparameters",), list(gen.BOUNDS))
    for k in gen.RANKS:
        what, limit = rank_limit(gen, k, d_in, d_out)
        if hyper[k] > limit:
            msg = f"{hyper[k]} exceeds {what} = {limit} (attach clamps ranks to it)"
            raise _err(path, _jpath(where + ("hyperparameters", k)), msg)
    try:
        cfg_t = gen.Config(**{**cfg.to_dict(), **hyper, "residual": cfg.residual})
    except (ValueError, TypeError) as e:
        raise _err(path, _jpath(where + ("hyperparameters",)), str(e)) from None
    try:  # what init checks at attach (BOFT's factors dividing d_in, ...): shapes alone can fit a misfit
        gen.check(cfg_t, d_in, d_out)
    except ValueError as e:
        raise _err(path, _jpath(where + ("hyperparameters",)), f"{gen.NAME} does not fit {name}: {e}") from None
    want = {k: v for k, v in gen.shapes(cfg_t, d_in, d_out).items() if k not in gen.SHARED}
    for k, shape_k in want.items():
        key = f"{name}.{k}"
        if key not in ck.table:
            raise _err(path, f"tensor {key!r}", f"missing ({gen.NAME} stores {', '.join(want)} per target)")
        got = tuple(ck.table[key][1])
        if got != tuple(shape_k):
            raise _err(path, f"tensor {key!r}", f"has shape {got}, spec expects {tuple(shape_k)}")
    return m, cfg_t, want, tmeta


def _plan_shared(ck: _File, gen, cfg, plans: dict) -> dict[str, tuple[int, ...]]:
    """{file key: shape} of the variant's SHARED tensors (stored once, `shared.<name>`), each
    present with the shape the adapter's largest target needs (VeRA's A (r, largest d_in));
    reads no tensor bytes. CheckpointError naming the tensor otherwise."""
    if not gen.SHARED:
        return {}
    _, _, want = shared_shapes(gen, cfg, (layer_dims(m) for m, *_ in plans.values()))
    out = {}
    for k, shape in want.items():
        key = SHARED_PREFIX + k
        if key not in ck.table:
            raise _err(ck.path, f"tensor {key!r}", f"missing ({gen.NAME} stores {k} once, shared by every target)")
        got = tuple(ck.table[key][1])
        if got != tuple(shape):
            msg = f"has shape {got}, spec expects {tuple(shape)} (r and the targets' largest d_in, d_out)"
            raise _err(ck.path, f"tensor {key!r}", msg)
        out[key] = tuple(shape)
    return out


def _finite(ck: _File, key: str) -> torch.Tensor:
    """The tensor `key` of the file; CheckpointError naming it when it holds NaN/inf."""
    t = ck.tensor(key)
    if not bool(torch.isfinite(t).all()):
        raise _err(ck.path, f"tensor {key!r}", "holds NaN/inf values (a diverged run?); refusing to load")
    return t


def _read_target(ck: _File, gen, name: str, m, cfg_t, want: dict, tmeta: dict, strict: bool) -> tuple:
    """Read one target's tensors (finite), compare the base weight's fingerprint: install's tuple."""
    path, where = ck.path, _jpath(("targets", name))
    tensors = {k: _finite(ck, f"{name}.{k}") for k in want}
    info = target_info(m, base_weight(m))
    dist = fingerprint_distance(info["fingerprint"], tmeta["fingerprint"])
    tol = FINGERPRINT_TOL_QUANT if (info["quantization"] or tmeta.get("quantization")) else FINGERPRINT_TOL
    if not dist <= tol:  # NaN (from absurd saved values) counts as a mismatch
        msg = f"base weight differs from the one the adapter was trained on (fingerprint distance {dist:.2f} > {tol})"
        if strict:
            raise _err(path, where, msg + f"; {gen.NAME}'s math depends on W, refusing to load")
        warnings.warn(_err(path, where, msg).args[0], stacklevel=3)
    info["loaded_from_quantization"] = tmeta.get("quantization")  # the base it was saved on
    info["loaded_fingerprint_distance"] = round(dist, 6)
    return m, cfg_t, tensors, info


# ---------------------------------------------------------------- writing


def save(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
    """Write the adapter attached as `name` to `path` (safetensors, format 2); returns `path`.
    The file holds that one adapter (with each target's ll.scale), in the same format whatever
    its name. Without `name`: the one adapter attached, whatever its name; with several attached
    it raises AttachError listing them (a checkpoint holds one adapter: save each under its
    name=, or ll.export_peft them all into one directory).

    The adapter dtype saved (config.dtype) is the one its tensors are held in: after
    `model.to(torch.bfloat16)` the file holds bfloat16 tensors and says dtype bfloat16, so load
    puts back the same tensors and the same logits. `model` may be wrapped (DDP, torch.compile,
    accelerate, FSDP2). In a distributed run only rank 0 writes: call save on rank 0 or on every
    rank; with FSDP2 every rank must call it (the sharded tensors are gathered).

    Before the destination is touched: every adapter tensor must be finite and all in one
    dtype (CheckpointError naming the tensors), and the metadata must pass the schema. The file
    is written to a temporary sibling `<name>.<random>.tmp` (created exclusively, never through
    a symlink, with the usual umask mode; an existing destination's mode is kept, and its owner
    where permitted), flushed to disk, read back and validated like load does, then renamed over
    the destination: the old file stays whole until the new one is complete, and a failed save
    removes its temporary file. While writing, the save holds an flock on its temporary file; a
    later successful save removes sibling temporary files left by killed saves, but only those
    it can lock (never a live one of a concurrent save), named as save names them and holding
    only the start of a checkpoint (never a user's own `.tmp` file). A symlink destination: the
    file it points to is replaced atomically (its temporary file sits next to it) and the link
    is kept.
    Raises AttachError when nothing (or no adapter `name`) is attached, or when `name` is omitted
    and several are; CheckpointError naming the path for I/O errors (disk full, read-only
    folder, a directory as destination), or naming the argument and its type for a `path` that
    is no str or os.PathLike.
    """
    if name is None:
        attached = list(states(model))
        if len(attached) > 1:
            raise AttachError(
                f"save: {len(attached)} adapters are attached ({', '.join(map(repr, attached))}) and a checkpoint "
                "holds one: pass name= (ll.save(model, path, name=...)), once per adapter"
            )
        name = attached[0] if attached else "default"
    check_name(name)
    st = state(model, name)
    if st is None:
        what = "no lora-lite adapter is attached" if name == "default" else f"no adapter named {name!r} is attached"
        raise AttachError(f"save: {what} to this model (nothing to save)")
    path = as_path(path, "save")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _err(path, None, f"ll.load refuses {path.suffix} files (pickle); name it .safetensors")
    tensors, targets, bad, held = {}, {}, [], None
    for name, t in st.targets.items():
        for k in t.tensors:
            key = f"{name}.{k}" if k not in st.variant.SHARED else SHARED_PREFIX + k  # a shared tensor: once
            if key in tensors:
                continue
            v = full(getattr(t.holder, k)).detach().to("cpu").contiguous()  # FSDP2: gathered
            held = held or (key, v.dtype)
            if v.dtype != held[1]:
                raise _err(
                    path,
                    f"tensor {key!r}",
                    f"is {dtype_name(v.dtype)}, but {held[0]!r} is {dtype_name(held[1])}; an adapter is saved "
                    "in one dtype (move the whole model with model.to(dtype)); not saved",
                )
            if not bool(torch.isfinite(v).all()):
                bad.append(key)
            tensors[key] = v
        targets[name] = {"hyperparameters": t.cfg.hyperparameters(), **t.info, "scale": t.scale}
    if bad:
        more = f" (and {len(bad) - 1} more: {', '.join(bad[1:4])}{', ...' if len(bad) > 4 else ''})"
        more = more if len(bad) > 1 else ""
        raise _err(path, f"tensor {bad[0]!r}", f"holds NaN/inf values{more}; not saved, {path} is untouched")
    meta = {
        "format_version": FORMAT_VERSION,
        "lora_lite_version": __version__,
        "spec_name": st.variant.NAME,
        "spec": spec_text(st.variant),
        "config": {**st.cfg.to_dict(), "dtype": dtype_name(held[1] if held else st.cfg.dtype)},  # as held
        "targets": targets,
    }
    meta["sha256"] = digest(meta, tensors)
    problem = _metadata_problem(meta)  # the same checks load makes, so load will not refuse it
    if problem:
        raise _err(path, _jpath(problem[0]), f"{problem[1]}; not saved")
    if not is_writer():  # a distributed run: rank 0 writes
        return path
    blob = safetensors_bytes(tensors, metadata={"lora_lite": json.dumps(meta, sort_keys=True)})
    _write_atomic(path, blob)
    return path


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _temp_prefix(real: Path) -> str:
    """`real`'s name, cut so that `<prefix>.<16 hex>.tmp` fits the usual 255-byte name limit."""
    name = real.name
    while len(os.fsencode(name)) > 255 - len(".0123456789abcdef.tmp"):
        name = name[:-1]
    return name


def _open_temp(real: Path) -> tuple[Path, int]:
    """A new, exclusively created, locked temporary sibling of `real`: (path, fd)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = real.with_name(f"{_temp_prefix(real)}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, flags, 0o666)  # the umask applies, as for any new file
        if fcntl is None:
            return tmp, fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits if a cleaner grabbed it before us
        except OSError:  # no locks on this file system: cleaners cannot lock it either, so never remove it
            return tmp, fd
        if os.fstat(fd).st_nlink:  # a cleaner that got there first unlinked it: try another name
            return tmp, fd
        os.close(fd)
    raise FileExistsError(errno.EEXIST, "could not create a temporary file next to it")


def _write_atomic(path: Path, blob: bytes) -> None:
    if "\0" in str(path):
        raise _err(path, None, "cannot write: the path holds a NUL byte")
    real = Path(os.path.realpath(path))  # a symlink: replace the file it points to
    try:
        if real.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        real.parent.mkdir(parents=True, exist_ok=True)
        try:
            old = os.stat(real)
        except FileNotFoundError:
            old = None
        tmp, fd = _open_temp(real)
    except OSError as e:
        raise _err(path, None, f"cannot write: {e.strerror or e}") from None
    try:
        _write_all(fd, blob)
        os.fsync(fd)
        with _File(tmp) as ck:  # read back: never put a file ll.load would refuse in place of a good one
            _check_metadata(ck)
        if old is not None:  # after the read-back, which a mode like 0o200 would forbid
            _keep_owner(fd, old)
            os.fchmod(fd, stat.S_IMODE(old.st_mode))
        os.replace(tmp, real)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        os.close(fd)
        if isinstance(e, OSError):
            raise _err(path, None, f"cannot write: {e.strerror or e}; the destination is untouched") from None
        if isinstance(e, CheckpointError):  # a bug: what save wrote does not read back
            raise _err(path, None, f"the written file did not read back ({e}); the destination is untouched") from None
        raise
    os.close(fd)
    _fsync_dir(real.parent)
    _remove_stale_temps(real)


def _keep_owner(fd: int, old: os.stat_result) -> None:
    """Give the new file the old one's owner and group where we may (root saving over a user's
    checkpoint must not leave it root's); elsewhere a file we may replace keeps ours."""
    new = os.fstat(fd)
    if (new.st_uid, new.st_gid) != (old.st_uid, old.st_gid):
        try:
            os.fchown(fd, old.st_uid, old.st_gid)
        except OSError:  # not permitted (not root): as any editor's atomic save
            pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# How every file save writes begins, after the 8-byte header length (safetensors puts
# __metadata__ first): a sibling .tmp file that does not begin so is not ours and is never removed.
_SAVE_START = b'{"__metadata__":{"lora_lite":'


def _is_partial_save(head: bytes) -> bool:
    """Whether `head` (a file's first bytes) can be the start of a file save wrote: a prefix of a
    header length below MAX_HEADER_BYTES (little-endian: bytes 3 to 7 are zero), then of _SAVE_START."""
    if any(head[3:8]):
        return False
    body = head[8 : 8 + len(_SAVE_START)]
    return body == _SAVE_START[: len(body)]


def _remove_stale_temps(real: Path) -> None:
    """Remove `<name>.<random>.tmp` siblings of killed saves: only those not locked by a live save
    and holding nothing but the start of a checkpoint (a user's own `.tmp` file is never removed)."""
    if fcntl is None:
        return
    pattern = re.compile(re.escape(_temp_prefix(real)) + r"\.[0-9a-f]{16}\.tmp")  # as _open_temp names them
    try:
        names = [p for p in os.listdir(real.parent) if pattern.fullmatch(p)]
    except OSError:
        return
    for name in names:
        p = real.parent / name
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            here, there = os.fstat(fd), os.lstat(p)
            same = stat.S_ISREG(here.st_mode) and (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
            if same and _is_partial_save(os.pread(fd, 8 + len(_SAVE_START), 0)):
                os.unlink(p)
        except OSError:  # locked by a live save (BlockingIOError) or gone
            pass
        finally:
            os.close(fd)
