"""The spec language as an algebra: basis x core x modifiers, each part defined once in parts/.

A part file `parts/<axis>/<name>.j2` is YAML metadata, then sections `--- <block>`, each a
Jinja2 template (its code fragments, indented as function bodies). Metadata keys:

    basis     produces (a HANDOFFS key), vin (name of the input side, Vh or P), select (allowed
              selections, first = default), calibration (none | optional | required, or by
              select), hyper, optional (hyperparameters a spec may declare to opt in: name -> [type,
              default, selects that take it]; blocks test `name in declared`); blocks formula,
              init (binds the hand-off's names)
    core      hooks, hyper, tensors (name -> shape, allowed inits), handoffs (per hand-off: inits
              the basis sets, frozen tensors that make a frozen part) or spectral: true (the
              hand-off U, S, vin kept frozen), freezable, scaled, dropout, cast_input, additive
              (true, false or the hooks on which update binds `delta`), runtime, embedding;
              blocks formula, update (binds `delta` or returns), factors, frozen, init, init_<h>,
              init_embedding, check
    modifier  cores (what the core must have), hooks, handoffs, residuals, exclusive, replaces,
              options, hyper, tensors, base_weight, runtime; blocks formula, init, pre, scale, update, wrap

`embedding: true` on every part of a composition (and nothing frozen) lets it adapt nn.Embedding
targets (Composition.embedding; the core's update and init_embedding blocks see `embedding`).
`hyper` maps a name to [type, default(, runtime)]; `bounds` maps each int or float one to its
[min, max] (what a cell's spec declares; a shipped spec declares its own). Shapes are expressions in r, d_in, d_out,
d_hook (the hooked side) and hyperparameters. compose() checks a composition and names the
rule it breaks; matrix() lists every cell with `works` or `refused: <rule>`.
"""

from __future__ import annotations

import ast
import itertools
import re
import textwrap
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import jinja2
import yaml

PARTS = Path(__file__).parent / "parts"
AXES = ("basis", "core", "modifier")
# What a basis hands to the core: the local names init() binds, with their shapes.
HANDOFFS = {
    "none": {},
    "usv": {"U": ("d_out", "r"), "S": ("r",), "vin": ("r", "d_in")},  # vin: Vh, or CorDA's P
    "qr": {"Q": ("d_out", "r"), "R": ("r", "d_in")},
    "p": {"P": ("r", "d_in")},
}
FROZEN_RESIDUALS = ("crop", "subtract")
ENV = jinja2.Environment(  # parts and templates/module.py.j2
    loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)


@dataclass(frozen=True)
class Part:
    axis: str
    name: str
    meta: dict
    blocks: dict[str, jinja2.Template] = field(repr=False)

    def has(self, block: str) -> bool:
        return block in self.blocks

    def render(self, block: str, **ctx) -> str:
        """The block's text rendered with `ctx` ('' when the part has no such block)."""
        return self.blocks[block].render(**ctx).rstrip("\n") if block in self.blocks else ""


@lru_cache(maxsize=1)
def parts() -> dict[str, dict[str, Part]]:
    """Every part definition, by axis and name (read once)."""
    out: dict[str, dict[str, Part]] = {}
    for axis in AXES:
        out[axis] = {}
        for path in sorted((PARTS / axis).glob("*.j2")):
            head, *sections = re.split(r"^--- (\w+)\n", path.read_text(encoding="utf-8"), flags=re.M)
            blocks = {k: ENV.from_string(v) for k, v in zip(sections[::2], sections[1::2])}
            out[axis][path.stem] = Part(axis, path.stem, yaml.safe_load(head) or {}, blocks)
    return out


def names(axis: str) -> list[str]:
    """Part names of one axis, for the schema's enums (lowrank first: the common core)."""
    return sorted(parts()[axis], key=lambda n: (n != "lowrank", n))


@dataclass
class Composition:
    """A checked choice of parts; `problems` holds (key path, rule, message) for each broken rule."""

    basis: Part
    select: str | None
    core: Part
    mods: dict[str, tuple[Part, dict]]  # kind -> (part, options), in spec order
    residual: str
    hook: str
    problems: list = field(default_factory=list)
    declared: frozenset = frozenset()  # the spec's hyperparameter names (its opt-in `optional` ones render code)

    @property
    def handoff(self) -> str:
        return self.basis.meta["produces"]

    @property
    def vin(self) -> str:
        return self.basis.meta.get("vin", "Vh")

    @property
    def frozen(self) -> bool:
        """True when the adapter holds part of W (a frozen part to crop or subtract)."""
        return self.core.meta.get("spectral") or bool(
            self.core.meta.get("handoffs", {}).get(self.handoff, {}).get("frozen")
        )

    @property
    def embedding(self) -> bool:
        """True when nn.Embedding targets work: every part declares `embedding: true` (basis none,
        core lowrank, modifiers scale and magnitude: PEFT's LoRA, rsLoRA, DoRA on embeddings),
        nothing is frozen, the hook is on the output."""
        every = all(p.meta.get("embedding") for p in self.all_parts())
        return every and not self.frozen and self.hook == "output" and all(t[1] for t in self.tensors().values())

    @property
    def calibration(self) -> str:
        c = self.basis.meta.get("calibration", "none")
        return c.get(self.select, "none") if isinstance(c, dict) else c

    def ctx(self) -> dict:
        """Variables every part block sees (and each modifier's options)."""
        opts = {k: v for _, o in self.mods.values() for k, v in o.items()}
        x = "xd" if "dropout" in self.mods else "x"  # the adapter's input
        return dict(
            select=self.select,
            handoff=self.handoff,
            vin=self.vin,
            hook=self.hook,
            frozen=self.frozen,
            x=x,
            embedding=self.embedding,
            **opts,
        ) | dict(declared=self.declared)

    def per_rank(self) -> dict[str, float]:
        """Hyperparameter -> exponent e: the math reads it over r ** e (alpha / r: 1, rsLoRA's
        alpha / sqrt(r): 0.5), so clamping r scales it by (r_clamped / r) ** e (a part's
        `per_rank`, keyed by its `rule` option where the rule decides)."""
        out = {}
        for p, opts in [(self.basis, {}), (self.core, {}), *self.mods.values()]:
            for h, e in p.meta.get("per_rank", {}).items():
                e = e.get(opts.get("rule")) if isinstance(e, dict) else e
                if e:
                    out[h] = float(e)
        return out

    def all_parts(self) -> list[Part]:
        return [self.basis, self.core] + [p for p, _ in self.mods.values()]

    def block(self, name: str) -> str:
        """The block from the modifier that replaces it, else from the core."""
        for p, _ in self.mods.values():
            if name in p.meta.get("replaces", ()):
                return p.render(name, **self.ctx())
        return self.core.render(name, **self.ctx())

    def hypers(self) -> dict[str, list]:
        """Hyperparameters the composition reads: name -> [type, default(, runtime)]."""
        out = {"r": ["int", 8]} if self.handoff != "none" else {}
        for p in self.all_parts():
            out.update(p.meta.get("hyper", {}))
        return out

    def optional_hypers(self) -> dict[str, list]:
        """Hyperparameters a spec may declare to opt in: name -> [type, default, selects allowed]."""
        out = {}
        for p in self.all_parts():
            out.update(p.meta.get("optional", {}))
        return out

    def replaced(self) -> set[str]:
        return {b for p, _ in self.mods.values() for b in p.meta.get("replaces", ())}

    def tensors(self) -> dict[str, tuple[tuple[str, ...], bool, tuple[str, ...]]]:
        """Tensors the composition reads: name -> (shape, trainable, allowed inits; first = default)."""
        side = "d_out" if self.hook == "output" else "d_in"
        out = {}
        ho = self.core.meta.get("handoffs", {}).get(self.handoff, {})
        for name, t in self.core.meta.get("tensors", {}).items():
            inits = (ho.get("init", {})[name],) if name in ho.get("init", {}) else tuple(t["init"])
            trainable = t.get("trainable", True)  # VeRA's shared random A and B are frozen
            out[name] = (tuple(side if s == "d_hook" else str(s) for s in t["shape"]), trainable, inits)
        frozen = dict(ho.get("frozen", {}))
        if self.core.meta.get("spectral"):
            frozen = {"lora_U": HANDOFFS["usv"]["U"], "lora_S": ("r",), f"lora_{self.vin}": ("r", "d_in")}
        out.update({n: (tuple(s), False, ("basis",)) for n, s in frozen.items()})
        for p, opts in self.mods.values():
            for name, t in p.meta.get("tensors", {}).items():
                out[name] = (tuple(str(s) for s in t["shape"]), t.get("trainable", True), tuple(t["init"]))
            for name in opts.get("tensors", ()):
                if name in out:
                    out[name] = (out[name][0], False, out[name][2])
        return out

    def shared(self) -> tuple[str, ...]:
        """Tensors the core keeps once per adapter, shared by every target (`shared: true`:
        VeRA's A and B): built by the core's `shared` block from the targets' largest d_in and
        d_out, frozen, and sliced per target by its update."""
        return tuple(n for n, t in self.core.meta.get("tensors", {}).items() if t.get("shared"))


def _modifier_problems(comp: Composition, i: int, part: Part, opts: dict) -> list:
    """Rules a modifier breaks on this composition: (path, rule, message)."""
    path, core, bad = ("modifiers", i, "kind"), comp.core, []
    have = {k: bool(core.meta.get(k)) for k in ("scaled", "freezable", "dropout")} | {"factors": core.has("factors")}
    for need in part.meta.get("cores", {}):
        if not have[need]:
            bad.append((path, "modifier-core", f"{part.name} needs a core with {need} (core {core.name!r} has none)"))
    text = "\n".join(part.render(b, factors="", **comp.ctx()) for b in part.blocks)
    lacks = sorted(set(re.findall(r"\bm\.(lora_\w+)", text)) - set(comp.tensors()))
    if lacks:  # e.g. delora's update reads lora_A and lora_B: only a core with those can take it
        bad.append((path, "modifier-core", f"{part.name} reads {lacks[0]}, which core {core.name!r} does not have"))
    for key, value, what in (("hooks", comp.hook, "hook"), ("handoffs", comp.handoff, "basis hand-off")):
        allowed = part.meta.get(key)
        if allowed and value not in allowed:
            bad.append((path, f"modifier-{what.split()[-1]}", f"{part.name} needs {what} in {allowed}, not {value!r}"))
    if part.meta.get("residuals") and comp.residual not in part.meta["residuals"]:
        bad.append(
            (path, "modifier-residual", f"{part.name} needs residual {part.meta['residuals']} (not {comp.residual!r})")
        )
    for other in part.meta.get("exclusive", ()):
        if other in comp.mods:
            bad.append((path, "modifier-exclusive", f"{part.name} does not compose with {other}"))
    for b in part.meta.get("replaces", ()):
        clash = [k for k, (p, _) in comp.mods.items() if k != part.name and (b in p.meta.get("replaces", ()) or k == b)]
        if clash:
            bad.append((path, "modifier-exclusive", f"{part.name} sets the {b} itself; {clash[0]} would be unused"))
    options = part.meta.get("options", {})
    for key, value in opts.items():
        if key not in options:
            bad.append((("modifiers", i, key), "modifier-option", f"{part.name} takes no option {key!r}"))
        elif options[key] == "freezable":
            wrong = [t for t in value if t not in core.meta.get("freezable", ())]
            if wrong or not value:
                allowed = core.meta.get("freezable", [])
                bad.append((("modifiers", i, key), "modifier-option", f"{part.name} can freeze {allowed}, not {value}"))
        elif value not in options[key]:
            bad.append((("modifiers", i, key), "modifier-option", f"{part.name} {key} is one of {options[key]}"))
    for key in options:
        if key not in opts:
            bad.append((path, "modifier-option", f"{part.name} needs option {key!r}"))
    return bad


def compose(basis: str, select, core: str, modifiers: list[dict], residual: str, hook: str) -> Composition:
    """Check a composition (names already valid for the schema); rules broken go to .problems."""
    P = parts()
    b, c = P["basis"][basis], P["core"][core]
    selects = b.meta.get("select")
    comp = Composition(b, select or (selects[0] if selects else None), c, {}, residual, hook)
    no = lambda path, rule, msg: comp.problems.append((path, rule, msg))  # noqa: E731
    if select and not selects:
        no(("basis", "select"), "select-basis", f"basis {basis!r} has no selection (select: {select!r})")
    elif selects and comp.select not in selects:
        no(("basis", "select"), "select-basis", f"basis {basis!r} selects one of {selects}")
    if hook not in c.meta["hooks"]:
        no(("hook",), "core-hook", f"core {core!r} works with hook {c.meta['hooks']}, not {hook!r}")
    takes = ["usv"] if c.meta.get("spectral") else list(c.meta.get("handoffs", {}))
    if comp.handoff not in takes:
        fits = sorted(n for n, p in P["basis"].items() if p.meta["produces"] in takes)
        no(("basis", "source"), "core-basis", f"core {core!r} needs a basis in {fits}, not {basis!r}")
    elif residual in FROZEN_RESIDUALS and not comp.frozen:
        no(("residual",), "residual-without-frozen-part", f"{residual} needs a basis the core takes part of W from")
    elif residual == "none" and comp.frozen:
        msg = f"basis {basis!r} puts part of W into the {core!r} core; residual none would count it twice"
        no(("residual",), "residual-counts-twice", msg + " (not identity at init): use crop or subtract")
    for i, m in enumerate(modifiers):
        if m["kind"] in comp.mods:
            no(("modifiers", i, "kind"), "modifier-twice", f"{m['kind']} is given twice")
        comp.mods[m["kind"]] = (P["modifier"][m["kind"]], {k: v for k, v in m.items() if k != "kind"})
    if c.meta.get("scaled") and "scale" not in comp.mods and "scale" not in comp.replaced():
        comp.mods = {"scale": (P["modifier"]["scale"], {"rule": "alpha_over_r"}), **comp.mods}  # LoRA's default
    for i, (kind, (part, opts)) in enumerate(comp.mods.items()):
        at = next((j for j, m in enumerate(modifiers) if m["kind"] == kind), i)
        comp.problems += _modifier_problems(comp, at, part, opts)
    return comp


def reads(text: str) -> set[str]:
    """Names a function-body fragment loads (for the typed hand-off check)."""
    tree = ast.parse("def _():\n" + textwrap.indent(textwrap.dedent(text) or "pass", "    "))
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def binds(text: str) -> set[str]:
    """Names a fragment assigns (a basis must bind its whole hand-off)."""
    tree = ast.parse(textwrap.dedent(text) or "pass")
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def handoff_problems(comp: Composition) -> list[str]:
    """The basis must bind every name of its hand-off; the core may read only those."""
    out = []
    made, want = (
        binds(comp.basis.render("init", **comp.ctx())),
        {comp.vin if k == "vin" else k for k in HANDOFFS[comp.handoff]},
    )
    if not want <= made:
        out.append(f"basis {comp.basis.name} does not bind {sorted(want - made)}")
    every = {n for h in HANDOFFS.values() for n in h} | {"Vh", "P"}
    read = reads(comp.core.render(f"init_{comp.handoff}", **comp.ctx())) & every
    if not read <= want:
        out.append(f"core {comp.core.name} reads {sorted(read - want)} from a {comp.handoff} hand-off")
    return out


# -- the matrix: each core with no modifier and with each single one, plus shipped combinations --
def cells(extra: list[tuple[str, ...]] = ()) -> list[dict]:
    """Every cell: basis, select, core, modifiers (tuple of kinds), residual, hook."""
    mods = [()] + [(m,) for m in names("modifier")] + sorted(set(extra))
    bases = [(b, s) for b in names("basis") for s in parts()["basis"][b].meta.get("select", [None])]
    keys = ("basis", "select", "core", "modifiers", "residual", "hook")
    grid = itertools.product(bases, names("core"), mods, ("none", "crop", "subtract"), ("output", "input"))
    return [dict(zip(keys, (*b, *rest))) for b, *rest in grid]


def modifier_entry(kind: str, core: Part) -> dict:
    """A modifier with its default options (frozen: the core's first freezable factor)."""
    out = {"kind": kind}
    for key, allowed in parts()["modifier"][kind].meta.get("options", {}).items():
        out[key] = [core.meta.get("freezable", ["?"])[0]] if allowed == "freezable" else allowed[0]
    if kind == "scale":
        out["rule"] = "alpha_over_sqrt_r"  # the default rule is the cell with no modifier
    return out


def cell_composition(cell: dict) -> Composition:
    """compose() for one cell, its modifiers at their default options."""
    mods = [modifier_entry(k, parts()["core"][cell["core"]]) for k in cell["modifiers"]]
    return compose(cell["basis"], cell["select"], cell["core"], mods, cell["residual"], cell["hook"])


def cell_spec(cell: dict, name: str) -> dict:
    """A complete spec (as parsed YAML) for a working cell, with every tensor at its default init."""
    comp = cell_composition(cell)
    bounds = {"r": [1, 65536]}  # the rank a basis hands over
    for p in comp.all_parts():
        bounds.update(p.meta.get("bounds", {}))
    hypers = {
        n: {"type": t, "default": d, "doc": f"{n} (its part's default)", **{f: True for f in flags}}
        | ({"min": bounds[n][0], "max": bounds[n][1]} if t != "bool" else {})
        | ({"rank": True} if n == "r" and not comp.shared() else {})  # a shared A fixes r for every target
        for n, (t, d, *flags) in comp.hypers().items()
    }
    values = {n: t["value"] for n, t in comp.core.meta.get("tensors", {}).items() if "value" in t}
    params = {
        n: {"shape": list(shape), "init": inits[0], "trainable": tr}
        | ({"value": values[n]} if n in values else {})
        | ({"shared": True} if n in comp.shared() else {})
        for n, (shape, tr, inits) in comp.tensors().items()
    }
    targets = ["\\.q_proj$", "\\.v_proj$"] if cell["hook"] == "output" else ["\\.down_proj$"]
    mods = [modifier_entry(k, comp.core) for k in cell["modifiers"]]
    return {
        **dict(name=name, title=name, summary="one cell of the spec matrix.", references=[]),
        **dict(identity="the core starts at the identity.", hyperparameters=hypers, target={"names": targets}),
        "basis": {"source": cell["basis"], **({"select": cell["select"]} if cell["select"] else {})},
        "core": {"kind": cell["core"]},
        **({"modifiers": mods} if mods else {}),
        **dict(residual=cell["residual"], hook=cell["hook"], params=params, train={"lr": 1.0e-3}, quantized_base=True),
    }


def matrix(extra: list[tuple[str, ...]] = ()) -> list[dict]:
    """One row per cell: basis (with its selection), core, modifiers, residual, hook, status, rule."""
    rows = []
    for cell in cells(extra):
        comp = cell_composition(cell)
        rule = comp.problems[0][1] if comp.problems else None
        row = {k: cell[k] for k in ("core", "residual", "hook")}
        basis = cell["basis"] + (f"+{cell['select']}" if cell["select"] else "")
        rows.append(
            {
                "basis": basis,
                **row,
                "modifiers": list(cell["modifiers"]),
                "status": "refused" if rule else "works",
                "rule": rule,
            }
        )
    return rows
