"""Load, validate and freeze one adapter spec (`specs/<name>.yaml`).

    load_spec(path) -> Spec          raises SpecError: one line per problem, best first,
                                     each `file:line: $.key.path: message`

YAML is read with PyYAML's safe loader; duplicate keys are refused (PyYAML keeps the last one
silently). The JSON Schema `specs/schema.json` catches structure and types; the checks here
catch what a schema cannot: shape expressions, the composition's rules (algebra.py), and the
tensors and hyperparameters it reads.
"""

from __future__ import annotations

import json
import keyword
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .algebra import Composition, compose, names, parts
from .shapes import eval_shape_expr, names_in, parse_shape_expr

# Config fields and methods (lora_lite.config.AdapterConfig); a hyperparameter may not shadow them.
RESERVED = {"target_names", "layers", "dtype", "residual", "variant", "hyperparameters", "to_dict"}
# Round-one spellings, read as their compositions (checkpoints carry the spec text they were saved with).
LEGACY_CORES = {"dora": ("lowrank", "magnitude"), "delora": ("lowrank", "delora"), "ia3": ("vector",)}
LEGACY_CORES["hra"] = ("householder",)


class SpecError(ValueError):
    """A spec is invalid. `str(err)` is one line per problem: `file:line: $.path: message`."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


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
        return compose(self.basis, self.select, self.core, list(self.modifiers), self.residual, self.hook)

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


class _Loader(yaml.SafeLoader):
    """Safe loader that records the line of every key path and refuses duplicate keys."""


def _walk(node: yaml.Node, path: tuple, lines: dict, problems: list, where: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                problems.append(
                    f"{where}:{key_node.start_mark.line + 1}: {_fmt(path)}: duplicate key {key!r} "
                    f"(first at line {seen[key]})"
                )
            seen[key] = key_node.start_mark.line + 1
            _walk(value_node, path + (key,), lines, problems, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines, problems, where)


def _fmt(path) -> str:
    out = "$"
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def parse_yaml(text: str, where: str) -> tuple[Any, dict]:
    """Parse YAML text safely; return (data, {key path: line}). Raises SpecError."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise SpecError([f"{where}: empty file"])
        lines: dict = {}
        problems: list[str] = []
        _walk(node, (), lines, problems, where)
        if problems:
            raise SpecError(problems)
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        msg = " ".join(str(getattr(e, "problem", None) or e).split())
        raise SpecError([f"{where}{line}: YAML syntax error: {msg}"]) from None
    finally:
        loader.dispose()
    return data, lines


def _line(lines: dict, path) -> str:
    path = tuple(path)
    while path and path not in lines:
        path = path[:-1]
    return f":{lines[path]}" if path in lines else ""


def _schema_problems(data: Any, lines: dict, where: str) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema())
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
        elif err.validator == "pattern" and "\\\\" in err.validator_value:
            msg = (
                "text may not contain backslashes, triple quotes or, in one-line fields, "
                "line breaks (it is copied into a docstring)"
            )
        elif err.validator == "not":
            msg = "text may not contain triple quotes (it is copied into a docstring)"
        line = f"{where}{_line(lines, path)}: {_fmt(path)}: {msg}"
        if line not in out:
            out.append(line)
    return out


def _same_shape(a: str, b: str, hypers: list[str]) -> bool:
    """Symbolic equality of two shape expressions: equal at three environments of distinct primes."""
    seeds = ((101, 103, *range(3, 200, 7)), (211, 223, *range(5, 300, 11)), (307, 311, *range(7, 400, 13)))
    envs = [dict(zip(["d_in", "d_out", *hypers], primes)) for primes in seeds]
    try:
        return all(eval_shape_expr(parse_shape_expr(a), e) == eval_shape_expr(parse_shape_expr(b), e) for e in envs)
    except (KeyError, ValueError):
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
            bad(p + ("default",), f"{d!r} is not a {h['type']}")
            continue
        if "min" in h and d < h["min"]:
            bad(p + ("default",), f"{d!r} is below min {h['min']}")
        if "max" in h and d > h["max"]:
            bad(p + ("default",), f"{d!r} is above max {h['max']}")
        if h.get("rank") and h["type"] != "int":
            bad(p + ("rank",), "only an int hyperparameter can be a rank")
    for i, rx in enumerate(data["target"]["names"]):
        try:
            re.compile(rx)
        except re.error as e:
            bad(("target", "names", i), f"bad regex {rx!r}: {e}")
    b, mods = data["basis"], data.get("modifiers", [])
    comp = compose(b["source"], b.get("select"), data["core"]["kind"], mods, data["residual"], data["hook"])
    for path, rule, msg in comp.problems:
        bad(path, f"{msg} (rule {rule})")
    if comp.problems:
        return problems
    need = comp.hypers()
    env = {n: h["default"] for n, h in hypers.items() if h["type"] == "int"}
    env.update(d_in=64, d_out=48)
    used = set(need)
    for name, p in data["params"].items():
        path = ("params", name)
        for i, expr in enumerate(p["shape"]):
            try:
                tree = parse_shape_expr(expr)
                unknown = [n for n in names_in(tree) if n not in env]
                used.update(names_in(tree))
                known = f"known: d_in, d_out and int hyperparameters {sorted(set(env) - {'d_in', 'd_out'})}"
                if unknown:
                    bad(path + ("shape", i), f"unknown name {unknown[0]!r} in {expr!r} ({known})")
                elif eval_shape_expr(tree, env) < 1:
                    bad(path + ("shape", i), f"{expr!r} is not positive with the defaults")
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
    for name in hypers:
        if name not in used:
            bad(("hyperparameters", name), f"the composition has no use for {name!r} (rule unused-hyper)")
    return problems


def parse_spec(text: str, where: str = "<spec>", stem: str | None = None) -> Spec:
    """Validate spec text and return a frozen Spec. Raises SpecError (one line per problem)."""
    data, lines = parse_yaml(text, where)
    data = upgrade(data)
    if not isinstance(data, dict):
        raise SpecError([f"{where}: $: expected a mapping of spec fields, got {type(data).__name__}"])
    problems = _schema_problems(data, lines, where)
    if problems:
        raise SpecError(problems)
    problems = _semantic_problems(data, lines, where, stem)
    if problems:
        raise SpecError(problems)
    hypers = tuple(
        Hyperparameter(n, h["type"], float(h["default"]) if h["type"] == "float" else h["default"], h["doc"],
                       h.get("min"), h.get("max"), h.get("rank", False), h.get("runtime", False))
        for n, h in data["hyperparameters"].items()
    )  # fmt: skip
    params = tuple(
        Param(n, tuple(map(str, p["shape"])), p["init"], p.get("trainable", True), p.get("value"), p.get("doc", ""))
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

    Raises SpecError (file missing, YAML syntax, schema, semantics), one line per problem.
    """
    path = Path(path)
    where = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError([f"{where}: cannot read: {e.strerror or e}"]) from None
    return parse_spec(text, where, stem=path.stem)
