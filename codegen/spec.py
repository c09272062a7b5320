"""Load, validate and freeze one adapter spec (`specs/<name>.yaml`).

    load_spec(path) -> Spec          raises SpecError: one line per problem, best first,
                                     each `file:line: $.key.path: message`

Spec text may come from untrusted hands (a checkpoint carries it), so it is checked in stages,
each refusing with SpecError before the next runs:
    parse_yaml       size (MAX_BYTES), then the YAML event stream: no aliases, nesting at most
                     MAX_DEPTH, at most MAX_EVENTS events; then PyYAML's safe composer and
                     constructor: string keys only, no duplicate keys (PyYAML would keep the last)
    _value_problems  every string and number, whatever its field: no control characters or line
                     separators (safety.FORBIDDEN), finite numbers of size <= 2**53, JSON types only
    upgrade          round-one spellings read as their compositions
    _schema_problems the JSON Schema `specs/schema.json` (enums from the parts): structure, types,
                     patterns, bounds
    _semantic_problems what a schema cannot say: defaults within min/max, shape expressions, the
                     composition's rules (algebra.py), the tensors and hyperparameters it reads
Nothing here raises anything but SpecError on bad input.
"""

from __future__ import annotations

import collections
import json
import keyword
import math
import os
import re
import stat
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .algebra import Composition, compose, names, parts
from .safety import FORBIDDEN, forbidden_char, regex_problem
from .shapes import divisors, eval_shape_expr, names_in, parse_shape_expr

# What one_line() escapes in a message: line breaks and every character spec text may not hold.
ONE_LINE_BAD = re.compile(FORBIDDEN.pattern[:-1] + "\n]")

# Config fields and methods (lora_lite.config.AdapterConfig); a hyperparameter may not shadow them.
RESERVED = {"target_names", "layers", "dtype", "residual", "variant", "hyperparameters", "to_dict"}
# Round-one spellings, read as their compositions (checkpoints carry the spec text they were saved with).
LEGACY_CORES = {"dora": ("lowrank", "magnitude"), "delora": ("lowrank", "delora"), "ia3": ("vector",)}
LEGACY_CORES["hra"] = ("householder",)


class SpecError(ValueError):
    """A spec is invalid. `str(err)` is one line per problem: `file:line: $.path: message`."""

    def __init__(self, problems: list[str]):
        self.problems = [one_line(p) for p in problems]
        super().__init__("\n".join(self.problems))


def one_line(text: str, limit: int = 500) -> str:
    """`text` with every line break or control character escaped (a message names what it got)."""
    text = ONE_LINE_BAD.sub(lambda m: ascii(m.group())[1:-1], str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Hyperparameter:
    name: str
    type: str  # "int" | "float" | "bool"
    default: int | float | bool
    doc: str
    min: float | None = None
    max: float | None = None
    rank: bool = False  # clamped per target to min(d_in, d_out)
    runtime: bool = False  # may change after attach (ll.set_coeff)


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[str, ...]  # shape expressions as written
    init: str  # zeros | ones | constant | kaiming_uniform | basis | core
    trainable: bool = True
    value: float | None = None
    doc: str = ""
    shared: bool = False  # one tensor per adapter, shared by every target (VeRA's A and B)


@dataclass(frozen=True)
class Spec:
    """A validated spec; `text` is its YAML (kept for checkpoints and reports)."""

    name: str
    title: str
    summary: str
    references: tuple[dict, ...]
    reference_impl: str
    math: str
    identity: str
    notes: str
    hyperparameters: tuple[Hyperparameter, ...]
    target_names: tuple[str, ...]
    basis: str
    select: str | None
    core: str
    modifiers: tuple[dict, ...]  # [{kind, options...}] as written
    residual: str
    hook: str
    params: tuple[Param, ...]
    lr: float
    quantized_base: bool
    source: str  # where it was read from, for messages and the generated header
    text: str  # the YAML text itself (checkpoints carry it, so custom specs reload anywhere)

    def composition(self) -> Composition:
        comp = compose(self.basis, self.select, self.core, list(self.modifiers), self.residual, self.hook)
        comp.declared = frozenset(h.name for h in self.hyperparameters)
        return comp

    def hyper(self, name: str) -> Hyperparameter | None:
        return next((h for h in self.hyperparameters if h.name == name), None)


def derived_enums() -> dict[str, list]:
    """The schema's enums, from the part definitions (codegen/parts/)."""
    mods = [p.meta.get("options", {}) for p in parts()["modifier"].values()]
    return {
        "basis_source": names("basis"),
        "basis_select": sorted({s for p in parts()["basis"].values() for s in p.meta.get("select", ())}),
        "core_kind": names("core"),
        "modifier_kind": names("modifier"),
        "modifier_rule": [r for o in mods for r in o.get("rule", ())],
    }


def schema_text(text: str) -> str:
    """specs/schema.json text with each `"<enum name>": {"enum": [...]}` line set from the parts."""
    for key, values in derived_enums().items():
        text = re.sub(rf'("{key}": {{"enum": )\[[^\]]*\]', lambda m: m.group(1) + json.dumps(values), text)
    return text


@lru_cache(maxsize=1)
def schema() -> dict:
    """The JSON Schema every spec obeys (shipped as package data in lora_lite.specs), enums from the parts."""
    return json.loads(schema_text((shipped_specs_dir() / "schema.json").read_text()))


def upgrade(data: dict) -> dict:
    """Round-one spellings as compositions: basis random -> none, core dora -> lowrank + magnitude,
    delora -> lowrank + delora, ia3 -> vector, hra -> householder (old checkpoints keep loading)."""
    if not isinstance(data, dict):
        return data
    if isinstance(data.get("basis"), dict) and data["basis"].get("source") == "random":
        data["basis"] = {**data["basis"], "source": "none"}
    core = data.get("core")
    if isinstance(core, dict) and core.get("kind") in LEGACY_CORES and "modifiers" not in data:
        kind, *mods = LEGACY_CORES[core["kind"]]
        data["core"] = {**core, "kind": kind}
        if mods:
            data["modifiers"] = [{"kind": m} for m in mods]
    return data


def shipped_specs_dir() -> Path:
    """Folder of the specs that ship with the package (the checkout's specs/ in editable mode)."""
    return Path(str(resources.files("lora_lite.specs")))


# Limits on a spec document, checked before anything is built from it: a shipped spec is ~3 KiB,
# 6 levels deep and ~400 YAML events.
MAX_BYTES = 256 * 1024
MAX_DEPTH = 20
MAX_EVENTS = 20_000
# A number in a spec is finite and at most 2**53 in size (ints and floats compare exactly there).
MAX_NUMBER = 2**53
# A tensor dimension a shape expression may give with the defaults.
MAX_DIM = 2**31
_STR_TAG = "tag:yaml.org,2002:str"
_INT_TAG = "tag:yaml.org,2002:int"


# Events come from libyaml when PyYAML has it (fast; iterative), else from PyYAML's own parser.
_EventLoader = getattr(yaml, "CSafeLoader", None) or yaml.SafeLoader


def _events(text: str, where: str) -> list[yaml.Event]:
    """The YAML event stream of `text`, bounded before any object is built.

    Refuses aliases (`*name`: no anchor expansion, so no "billion laughs"), nesting deeper than
    MAX_DEPTH (the composer recurses per level) and more than MAX_EVENTS events.
    """
    depth, out = 0, []
    loader = _EventLoader(text)
    try:
        while loader.check_event():
            ev = loader.get_event()
            out.append(ev)
            line = ev.start_mark.line + 1 if ev.start_mark else 0
            if isinstance(ev, yaml.AliasEvent):
                raise SpecError([f"{where}:{line}: $: YAML aliases (*{ev.anchor}) are not allowed in a spec"])
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise SpecError([f"{where}:{line}: $: nested deeper than {MAX_DEPTH} levels"])
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
            if len(out) > MAX_EVENTS:
                raise SpecError([f"{where}:{line}: $: more than {MAX_EVENTS} YAML nodes (a spec is a few hundred)"])
    finally:
        loader.dispose()
    return out


class _Replay(yaml.composer.Composer, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
    """PyYAML's safe composer and constructor, fed from a checked event list instead of a parser."""

    def __init__(self, events: list[yaml.Event]):
        self._queue = collections.deque(events)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)

    def check_event(self, *choices) -> bool:
        return bool(self._queue) and (not choices or isinstance(self._queue[0], choices))

    def peek_event(self) -> yaml.Event:
        return self._queue[0]

    def get_event(self) -> yaml.Event:
        return self._queue.popleft()


def _walk(node: yaml.Node, path: tuple, lines: dict, problems: list, where: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == _STR_TAG):
                what = key_node.value if isinstance(key_node, yaml.ScalarNode) else type(key_node).__name__
                problems.append(
                    f"{where}:{key_line}: {_fmt(path)}: key {what!r} is not a string "
                    f"({key_node.tag.rsplit(':', 1)[-1]}); keys must be plain names"
                )
                continue
            key = key_node.value
            if key in seen:
                problems.append(f"{where}:{key_line}: {_fmt(path)}: duplicate key {key!r} (first at line {seen[key]})")
            seen[key] = key_line
            _walk(value_node, path + (key,), lines, problems, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines, problems, where)
    elif node.tag == _INT_TAG and len(node.value) > 40:  # Python refuses ints of > 4300 digits; none is sane
        problems.append(f"{where}:{lines[path]}: {_fmt(path)}: an integer of {len(node.value)} characters")


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_]+\Z")


def _fmt(path) -> str:
    out = "$"
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _PLAIN_KEY.match(p):
            out += f".{p}"
        else:
            out += f"[{ascii(p)}]"  # a key with dots, spaces or control characters stays readable, one line
    return out


def _yaml_error(e: yaml.YAMLError, text: str, where: str) -> SpecError:
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        line = f":{mark.line + 1}"
    elif isinstance(getattr(e, "position", None), int):  # ReaderError: a character YAML refuses
        line = f":{text.count(chr(10), 0, e.position) + 1}"
    else:
        line = ""
    msg = " ".join(str(getattr(e, "problem", None) or e).split())
    return SpecError([f"{where}{line}: $: YAML syntax error: {msg}"])


def parse_yaml(text: str, where: str) -> tuple[Any, dict]:
    """Parse YAML text safely; return (data, {key path: line}). Raises SpecError.

    Refused before any object is built: text over MAX_BYTES, aliases, nesting over MAX_DEPTH,
    more than MAX_EVENTS nodes, keys that are not strings, duplicate keys.
    """
    if not isinstance(text, str):
        raise SpecError([f"{where}: $: spec text must be a string, got {type(text).__name__}"])
    if len(text) > MAX_BYTES:
        raise SpecError([f"{where}: $: {len(text)} characters; a spec may hold at most {MAX_BYTES}"])
    try:
        loader = _Replay(_events(text, where))
        node = loader.get_single_node()
        if node is None:
            raise SpecError([f"{where}: $: empty file"])
        lines: dict = {}
        problems: list[str] = []
        _walk(node, (), lines, problems, where)
        if problems:
            raise SpecError(problems)
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        raise _yaml_error(e, text, where) from None
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as e:
        if isinstance(e, SpecError):
            raise
        msg = " ".join(str(e).split())[:200]
        raise SpecError([f"{where}: $: cannot read a value: {type(e).__name__}: {msg}"]) from None
    return data, lines


def _value_problems(data: Any, lines: dict, where: str) -> list[str]:
    """Every string and number in the document, whatever its field, before the schema looks.

    Strings (keys too) may not hold safety.FORBIDDEN characters (control characters, U+0085,
    U+2028/2029, bidirectional overrides, lone surrogates), nor line breaks outside the
    multi-line prose fields (Python's `$` in a schema pattern lets a trailing one through);
    numbers must be finite and at most MAX_NUMBER in size; YAML types JSON lacks (dates, binary,
    sets) are refused.
    """
    out: list[str] = []
    # line breaks only where the schema takes multi-line prose ($defs/text: math, identity, notes)
    multiline = {(k,) for k, v in schema()["properties"].items() if v.get("$ref") == "#/$defs/text"}

    def bad(path, msg):
        out.append(f"{where}{_line(lines, path)}: {_fmt(path)}: {msg}")

    def visit(x, path):
        if isinstance(x, dict):
            for k, v in x.items():
                why = forbidden_char(k, allow_newline=False)
                if why:
                    bad(path + (k,), f"a key holds {why}; keys are plain names")
                    continue
                visit(v, path + (k,))
        elif isinstance(x, list):
            for i, v in enumerate(x):
                visit(v, path + (i,))
        elif isinstance(x, str):
            why = forbidden_char(x, allow_newline=path in multiline)
            if why and why.startswith("a line break"):
                bad(path, f"text holds {why}; only {', '.join(k for (k,) in sorted(multiline))} may span lines")
            elif why:
                bad(path, f"text holds {why}; spec text may not contain control characters or line separators")
        elif isinstance(x, bool) or x is None:
            pass
        elif isinstance(x, (int, float)):
            if not math.isfinite(x):
                bad(path, f"{x!r} is not a finite number")
            elif abs(x) > MAX_NUMBER:
                bad(path, f"{x!r} is larger than 2**53 in size")
        else:
            bad(path, f"YAML {type(x).__name__} values are not allowed (quote it to make a string)")

    visit(data, ())
    return out


def _line(lines: dict, path) -> str:
    path = tuple(path)
    while path and path not in lines:
        path = path[:-1]
    return f":{lines[path]}" if path in lines else ""


_NUMBER_LIKE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE]\d+\Z")


@lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema())


def _schema_problems(data: Any, lines: dict, where: str) -> list[str]:
    validator = _validator()
    defs = schema()["$defs"]
    errors = sorted(validator.iter_errors(data), key=jsonschema.exceptions.relevance)
    out = []
    for err in errors:
        path = tuple(err.absolute_path)
        msg = err.message
        if err.validator == "additionalProperties":
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            msg = "unexpected key " + ", ".join(repr(k) for k in extra)
            if extra:
                out.append(f"{where}{_line(lines, path + (extra[0],))}: {_fmt(path)}: {msg}")
                continue
        elif err.validator == "pattern" and err.validator_value == defs["line"]["pattern"]:
            msg = (
                "one line of text: no line breaks, backslashes or control characters, "
                "no space at either end (it is copied into a docstring or a comment)"
            )
        elif err.validator == "pattern" and err.validator_value == defs["text"]["pattern"]:
            msg = "text may not contain backslashes, triple quotes or control characters (it goes into a docstring)"
        elif err.validator == "not":
            msg = "text may not contain triple quotes (it is copied into a docstring)"
        elif err.validator in ("maxLength", "minLength"):
            msg = f"text of {len(err.instance)} characters; {err.validator[:3]} {err.validator_value}"
        elif err.validator == "type" and isinstance(err.instance, str) and _NUMBER_LIKE.match(err.instance):
            msg += " (YAML reads a number like 1.0e6 as text: write 1.0e+6)"
        elif err.validator in ("maxItems", "maxProperties"):
            msg = f"{len(err.instance)} entries; at most {err.validator_value}"
        line = f"{where}{_line(lines, path)}: {_fmt(path)}: {msg}"
        if line not in out:
            out.append(line)
    return out


def _same_shape(a: str, b: str, hypers: list[str]) -> bool:
    """Symbolic equality of two shape expressions: equal at three environments of distinct primes.
    A name neither d_in, d_out nor a hyperparameter compares equal here: its own rule reports it
    (unknown name, missing-hyper), not this one."""
    seeds = ((101, 103, *range(3, 200, 7)), (211, 223, *range(5, 300, 11)), (307, 311, *range(7, 400, 13)))
    envs = [dict(zip(["d_in", "d_out", *hypers], primes)) for primes in seeds]
    try:
        return all(eval_shape_expr(parse_shape_expr(a), e) == eval_shape_expr(parse_shape_expr(b), e) for e in envs)
    except KeyError:
        return True
    except ValueError:
        return False


def _semantic_problems(data: dict, lines: dict, where: str, stem: str | None) -> list[str]:
    problems: list[str] = []

    def bad(path, msg):
        problems.append(f"{where}{_line(lines, path)}: {_fmt(path)}: {msg}")

    if stem is not None and data["name"] != stem:
        bad(("name",), f"{data['name']!r} must equal the file name {stem!r}")
    hypers = data["hyperparameters"]
    for name, h in hypers.items():
        p = ("hyperparameters", name)
        if name in RESERVED or keyword.iskeyword(name):
            bad(p, f"{name!r} is reserved (config fields: {sorted(RESERVED)})")
        d = h["default"]
        want = {"int": int, "float": (int, float), "bool": bool}[h["type"]]
        if isinstance(d, bool) != (h["type"] == "bool") or not isinstance(d, want):
            bad(p + ("default",), f"{d!r} is not {'an' if h['type'] == 'int' else 'a'} {h['type']}")
            continue
        if h["type"] == "bool":
            for k in ("min", "max"):
                if k in h:
                    bad(p + (k,), "a bool hyperparameter has no bounds")
            continue
        if h["type"] == "int" and not all(isinstance(h[k], int) for k in ("min", "max")):
            k = next(k for k in ("min", "max") if not isinstance(h[k], int))
            bad(p + (k,), f"{h[k]!r}: the bounds of an int hyperparameter are integers")
            continue
        if h["min"] > h["max"]:
            bad(p + ("min",), f"min {h['min']} is above max {h['max']}")
        elif d < h["min"]:
            bad(p + ("default",), f"{d!r} is below min {h['min']}")
        elif d > h["max"]:
            bad(p + ("default",), f"{d!r} is above max {h['max']}")
        if h.get("rank") and h["type"] != "int":
            bad(p + ("rank",), "only an int hyperparameter can be a rank")
    for i, rx in enumerate(data["target"]["names"]):
        try:
            re.compile(rx)
        except (re.error, OverflowError, RecursionError) as e:
            bad(("target", "names", i), f"bad regex {rx!r}: {e}")
            continue
        if problem := regex_problem(rx):
            bad(("target", "names", i), f"regex {rx!r}: {problem}")
    b, mods = data["basis"], data.get("modifiers", [])
    comp = compose(b["source"], b.get("select"), data["core"]["kind"], mods, data["residual"], data["hook"])
    for path, rule, msg in comp.problems:
        bad(path, f"{msg} (rule {rule})")
    if comp.problems:
        return problems
    need, optional = comp.hypers(), comp.optional_hypers()
    env = {n: h["default"] for n, h in hypers.items() if h["type"] == "int"}
    env.update(d_in=64, d_out=48)
    used = set(need) | (set(optional) & set(hypers))
    for name, p in data["params"].items():
        path = ("params", name)
        for i, expr in enumerate(p["shape"]):
            try:
                tree = parse_shape_expr(expr)
                unknown = [n for n in names_in(tree) if n not in env]
                used.update(names_in(tree))
                known = f"known: d_in, d_out and int hyperparameters {sorted(set(env) - {'d_in', 'd_out'})}"
                low = [d for d in divisors(tree) if d in hypers and not hypers[d].get("min", 0) >= 1]
                if unknown:
                    bad(path + ("shape", i), f"unknown name {unknown[0]!r} in {expr!r} ({known})")
                elif low:
                    bad(path + ("shape", i), f"{expr!r} divides by {low[0]!r}, whose min must be at least 1")
                elif not 1 <= (size := eval_shape_expr(tree, env)) <= MAX_DIM:
                    bad(path + ("shape", i), f"{expr!r} is {size} with the defaults; a size is in [1, 2**31]")
            except ValueError as e:
                bad(path + ("shape", i), f"bad shape expression: {e}")
        if p["init"] == "constant" and "value" not in p:
            bad(path + ("init",), "init 'constant' needs a 'value'")
    where_from = f"core {comp.core.name!r} on basis {comp.basis.name!r}"
    for name, (shape, trainable, inits) in comp.tensors().items():
        p = data["params"].get(name)
        if p is None:
            bad(("params",), f"{where_from} needs tensor {name!r} (shape {list(shape)}) (rule missing-param)")
            continue
        s = [str(x) for x in p["shape"]]
        if len(s) != len(shape) or not all(_same_shape(x, y, sorted(hypers)) for x, y in zip(s, shape)):
            bad(("params", name, "shape"), f"{s} differs from {list(shape)} that {where_from} reads (rule shape)")
        if p.get("trainable", True) != trainable:
            bad(("params", name, "trainable"), f"the composition needs it {'trainable' if trainable else 'frozen'}")
        if p.get("shared", False) != (name in comp.shared()):
            how = "shared: true (one tensor for every target)" if name in comp.shared() else "not shared"
            bad(("params", name, "shared"), f"the composition needs it {how}")
        if p["init"] not in inits:
            why = "the basis sets it" if inits == ("basis",) else f"allowed: {list(inits)}"
            bad(("params", name, "init"), f"init {p['init']!r} for {name}: {why} (rule init)")
    for name in data["params"]:
        if name not in comp.tensors():
            bad(("params", name), f"{where_from} never reads {name!r} (rule unused-param)")
    for name, (typ, *_rest) in need.items():
        if name not in hypers:
            bad(("hyperparameters",), f"the composition needs hyperparameter {name!r} ({typ}) (rule missing-hyper)")
        elif hypers[name]["type"] != typ:
            bad(("hyperparameters", name, "type"), f"{name} is a {typ} (rule hyper-type)")
    for name, (typ, _default, selects) in optional.items():
        if name not in hypers or name in need:
            continue
        if hypers[name]["type"] != typ:
            bad(("hyperparameters", name, "type"), f"{name} is a {typ} (rule hyper-type)")
        elif comp.select not in selects:
            msg = f"{name} needs select {' or '.join(selects)}, not {comp.select!r} (rule optional-hyper)"
            bad(("hyperparameters", name), msg)
    for part in comp.all_parts():  # a part's bounds are the most its code takes (loop counts, sizes)
        for name, (lo, hi) in part.meta.get("bounds", {}).items():
            h = hypers.get(name)
            if h is None or h["type"] == "bool" or not (h["min"] < lo or h["max"] > hi):
                continue
            k = "min" if h["min"] < lo else "max"
            msg = f"{h[k]!r} is outside [{lo}, {hi}], what {part.name!r} takes (rule bounds)"
            bad(("hyperparameters", name, k), msg)
    for name in hypers:
        if name not in used:
            bad(("hyperparameters", name), f"the composition has no use for {name!r} (rule unused-hyper)")
    return problems


def parse_spec(text: str, where: str = "<spec>", stem: str | None = None) -> Spec:
    """Validate spec text and return a frozen Spec. Raises SpecError (one line per problem)."""
    data, lines = parse_yaml(text, where)
    if not isinstance(data, dict):
        raise SpecError([f"{where}: $: expected a mapping of spec fields, got {type(data).__name__}"])
    problems = _value_problems(data, lines, where)
    if problems:
        raise SpecError(problems)
    data = upgrade(data)
    problems = _schema_problems(data, lines, where)
    if problems:
        raise SpecError(problems)
    problems = _semantic_problems(data, lines, where, stem)
    if problems:
        raise SpecError(problems)
    hypers = tuple(
        Hyperparameter(
            name=n,
            type=h["type"],
            default=float(h["default"]) if h["type"] == "float" else h["default"],
            doc=h["doc"],
            min=float(h["min"]) if h["type"] == "float" else h.get("min"),
            max=float(h["max"]) if h["type"] == "float" else h.get("max"),
            rank=h.get("rank", False),
            runtime=h.get("runtime", False),
        )
        for n, h in data["hyperparameters"].items()
    )
    params = tuple(
        Param(
            n,
            tuple(map(str, p["shape"])),
            p["init"],
            p.get("trainable", True),
            p.get("value"),
            p.get("doc", ""),
            p.get("shared", False),
        )
        for n, p in data["params"].items()
    )
    return Spec(
        name=data["name"],
        title=data["title"],
        summary=data["summary"],
        references=tuple(data["references"]),
        reference_impl=data.get("reference_impl", ""),
        math=data.get("math", "").rstrip(),
        identity=data["identity"].rstrip(),
        notes=data.get("notes", "").rstrip(),
        hyperparameters=hypers,
        target_names=tuple(data["target"]["names"]),
        basis=data["basis"]["source"],
        select=data["basis"].get("select"),
        core=data["core"]["kind"],
        modifiers=tuple(data.get("modifiers", ())),
        residual=data["residual"],
        hook=data["hook"],
        params=params,
        lr=float(data["train"]["lr"]),
        quantized_base=data["quantized_base"],
        source=where,
        text=text,
    )


def load_spec(path: str | Path, display: str | None = None) -> Spec:
    """Read and validate `path`. `display` is how messages and headers name the file.

    Raises SpecError (file missing or unreadable, over MAX_BYTES, not UTF-8, YAML syntax, schema,
    semantics), one line per problem.
    """
    path = Path(path)
    where = display or str(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block, /dev/zero never end
            raise SpecError([f"{where}: cannot read: not a regular file"])
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)  # never more: a huge file is refused, not read
    except SpecError:
        raise
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise SpecError([f"{where}: cannot read: {getattr(e, 'strerror', None) or e}"]) from None
    if len(raw) > MAX_BYTES:
        raise SpecError([f"{where}: $: larger than {MAX_BYTES // 1024} KiB; a spec is a few KiB"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise SpecError([f"{where}:{line}: $: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})"]) from None
    return parse_spec(text, where, stem=path.stem)
