"""Render validated specs into hook modules under generated/.

    render(spec) -> str            the module text (deterministic; compiled, allow-list checked)
    generate(specs_dir, out_dir)   write changed files, remove orphans; returns changed paths
    check(specs_dir, out_dir)      render in memory; returns stale/missing/orphaned paths

All choices are made here in Python (which fragment, which lines); the templates only place
finished values. Fragments live in templates/: basis/<source>.j2 computes the basis,
core/<kind>_init_<family>.j2 turns it into adapter tensors, core/<kind>_init.j2 fills the
tensors a spec marks `init: core` (DoRA's magnitude, HRA's paired vectors),
core/<kind>_forward_<hook>.j2 is the hook math, core/<kind>_frozen.j2 is the part of W a
variant with a frozen part takes over. Such a variant's forward is
core/<kind>_forward_<hook>_frozen.j2: it serves both residual modes, crop (W holds W_res) and
subtract (W untouched, the hook takes the frozen part out), chosen by cfg.residual at run time.
"""

from __future__ import annotations

import keyword
import textwrap
from pathlib import Path

import jinja2

from .atomic import write_atomic
from .safety import UnsafeText, comment_text, doc_text, literal, verify
from .shapes import parse_shape_expr, to_python
from .spec import CORES, FROZEN_RESIDUALS, SPECTRAL_INPUT, SpecError

TEMPLATES = Path(__file__).parent / "templates"
HEADER_CMD = "just gen"  # printed in every header

# Bases that produce U (o, r), S (r,), Vh (r, i) share the "svd" core-init fragments.
# "pca" produces P (r, i), the top-r principal directions of the layer's inputs.
# "corda" produces U (o, r), S (r,) and an oblique P (r, i) in place of Vh: its own family.
BASIS_FAMILY = {"svd": "svd", "pca": "pca", "corda": "corda"}
# Cores that share init and frozen fragments under another name: the spectral cores all store
# the same frozen basis (core/spectral_init_<family>.j2, core/spectral_frozen.j2).
SHARED_FRAGMENTS = {"gain": "spectral", "ablate": "spectral", "arrow": "spectral"}

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
    autoescape=False,
)


def _fragment(path: str) -> bool:
    return (TEMPLATES / path).is_file()


def fragment_names(
    core: str, hook: str, basis: str, residual: str, own_init: bool = False, select: str | None = None
) -> dict[str, str | None]:
    """Which template fragments a (core, hook, basis, residual) combination uses.

    own_init: the spec has tensors with `init: core` (filled by core/<kind>_init.j2).
    select: a re-selection of the basis directions (basis/<source>_<select>.j2, e.g. svd_wanda).
    check: core/<kind>_check.j2, when it exists, raises before any work for a config the core
    cannot use on this layer (arrow's block >= r).
    A residual crop or subtract means a frozen part: the forward fragment is the one with both
    residual branches (core/<kind>_forward_<hook>_frozen.j2) and frozen_weight() is emitted.
    """
    family = BASIS_FAMILY.get(basis)
    shared = SHARED_FRAGMENTS.get(core, core)
    check = f"core/{core}_check.j2"
    frozen = residual in FROZEN_RESIDUALS
    return {
        "check": check if _fragment(check) else None,
        "core_own_init": f"core/{core}_init.j2" if own_init else None,
        "basis": (f"basis/{basis}_{select}.j2" if select else f"basis/{basis}.j2") if family else None,
        "core_init": f"core/{shared}_init_{family}.j2" if family else None,
        "forward": f"core/{core}_forward_{hook}{'_frozen' if frozen else ''}.j2",
        "frozen": f"core/{shared}_frozen.j2" if frozen else None,
    }


def has_fragments(
    core: str, hook: str, basis: str, residual: str, own_init: bool = False, select: str | None = None
) -> list[str]:
    """Messages for each fragment the combination needs but the compiler lacks (empty = ok)."""
    what = {
        "core_own_init": f"init 'core' for core {core!r}",
        "check": "",
        "basis": f"basis {basis!r}" + (f" with select {select!r}" if select else ""),
        "core_init": f"core {core!r} on basis {basis!r}",
        "forward": f"core {core!r} with hook {hook!r}" + (f" and residual {residual!r}" if residual != "none" else ""),
        "frozen": f"core {core!r} with residual {residual!r}",
    }
    return [
        f"{what[k]} is not supported (no template {p})"
        for k, p in fragment_names(core, hook, basis, residual, own_init, select).items()
        if p and not _fragment(p)
    ]


def py(value) -> str:
    """Python literal for a spec value, quoted as ruff writes it (safety.literal: checked to read back)."""
    return literal(value)


def _comment(text: str) -> str:
    """A trailing `  # text` for a line of generated code ("" for no text), via safety.comment_text."""
    text = comment_text(text)
    return f"  # {text}" if text else ""


def _dict_literal(d: dict, room: int) -> str:
    """py(d) on one line if it fits in `room` characters, else one item per line (as ruff formats it)."""
    one = py(d)
    if len(one) <= room:
        return one
    return "{\n" + "".join(f"    {py(k)}: {py(v)},\n" for k, v in d.items()) + "}"


def _dims_comment(shape: tuple[str, ...]) -> str:
    short = {"d_in": "i", "d_out": "o"}
    return "(" + ", ".join(short.get(s, s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _simple_init(p) -> list[str]:
    dims = ", ".join(to_python(parse_shape_expr(s), "cfg") for s in p.shape)
    c = _dims_comment(p.shape)
    key = f"t[{py(p.name)}]"
    if p.init == "zeros":
        return [f"{key} = torch.zeros({dims})  # {c}"]
    if p.init == "ones":
        return [f"{key} = torch.ones({dims})  # {c}"]
    if p.init == "constant":
        return [f"{key} = torch.full(({dims},), {py(p.value)})  # {c}"]
    if p.init == "kaiming_uniform":
        return [
            f"{key} = torch.empty({dims})  # {c}",
            f"nn.init.kaiming_uniform_({key}, a=math.sqrt(5))  # as nn.Linear (PEFT's lora_A init)",
        ]
    raise AssertionError(p.init)


def _docstring(spec) -> str:
    first = f"{spec.title}: {spec.summary}"
    refs = []
    for r in spec.references:
        bits = [r.get("authors"), str(r["year"]) if "year" in r else None]
        who = " ".join(b for b in bits if b)
        line = f"{who}, {r['title']}" if who else r["title"]
        if "arxiv" in r:
            line += f", arXiv {r['arxiv']}"
        refs.append(textwrap.fill(line + ".", width=96))
    if spec.reference_impl:
        refs.append(f"Reference implementation: {spec.reference_impl}.")
    parts = [first, "\n".join(refs), textwrap.indent(spec.math, "    "), "Identity at init: " + spec.identity]
    if spec.notes:
        parts.append(spec.notes)
    other = {"crop": " (or subtract: cfg.residual)", "subtract": " (or crop: cfg.residual)"}.get(spec.residual, "")
    parts.append(
        f"Spec: basis={spec.basis}{'+' + spec.select if spec.select else ''}, core={spec.core}, "
        f"residual={spec.residual}{other}, hook={spec.hook}."
    )
    return doc_text("\n\n".join(p for p in parts if p))


# The RESIDUAL line of a module, by the spec's residual (the default of cfg.residual).
RESIDUAL_LINES = {
    "none": 'RESIDUAL = "none"  # the base weight is never modified',
    "crop": 'RESIDUAL = "crop"  # default: while attached the base weight holds W_res = W - frozen_weight()',
    "subtract": 'RESIDUAL = "subtract"  # default: W is never modified; forward() takes frozen_weight() x out',
}


def _quantized_line(spec) -> str:
    if not spec.quantized_base:
        return "QUANTIZED_BASE = False  # attach refuses bitsandbytes 4/8-bit targets"
    if spec.residual in FROZEN_RESIDUALS:
        return "QUANTIZED_BASE = True  # bitsandbytes 4/8-bit targets work with residual subtract (crop is refused)"
    return "QUANTIZED_BASE = True  # bitsandbytes 4/8-bit targets work (the hook runs on their own forward)"


# The CAST_INPUT line of a module and its forward()'s docstring, by (cast_input, hook).
CAST_LINES = {
    (True, "output"): "CAST_INPUT = True  # the hook casts x to cfg.dtype for forward()",
    (True, "input"): "CAST_INPUT = True  # the hook casts x to cfg.dtype for forward(), and the new input back",
    (False, "output"): "CAST_INPUT = False  # forward() works in the layer's dtype: the hook passes x uncast",
    (False, "input"): "CAST_INPUT = False  # forward() works in the layer's dtype: the hook casts nothing",
}
FORWARD_DOCS = {
    (True, "output"): "New output of target `m`. x: (..., i) input in the adapter dtype; y: (..., o) base output.",
    (True, "input"): "New input of target `m`. x: (..., i) input in the adapter dtype; the hook casts back.",
    (False, "output"): "New output of target `m`. x: (..., i) input in the layer's dtype; y: (..., o) base output.",
    (False, "input"): "New input of target `m`. x: (..., i) input in the layer's dtype, kept in the result.",
}


def context(spec, display: str) -> dict:
    """Everything the module template needs, as finished strings and lists."""
    pytype = {"int": "int", "float": "float", "bool": "bool"}
    fields = [(_identifier(h.name), pytype[h.type], py(h.default), _comment(h.doc)) for h in spec.hyperparameters]
    params = [(py(p.name), py(tuple(p.shape)), py(p.init), py(p.trainable), _comment(p.doc)) for p in spec.params]
    shape_lines = [
        (py(p.name), ", ".join(to_python(parse_shape_expr(s), "cfg") for s in p.shape) + "," * (len(p.shape) == 1))
        for p in spec.params
    ]
    simple = [line for p in spec.params if p.init not in ("basis", "core") for line in _simple_init(p)]
    own_init = any(p.init == "core" for p in spec.params)
    frags = fragment_names(spec.core, spec.hook, spec.basis, spec.residual, own_init, spec.select)
    base_weight = CORES[spec.core].get("base_weight")  # None | "init" | "forward"
    cast = (CORES[spec.core].get("cast_input", True), spec.hook)
    return dict(
        source=comment_text(display),
        regen=HEADER_CMD,
        docstring=_docstring(spec),
        config_doc=doc_text(f"{spec.title} hyperparameters (defaults from {display})."),
        name=py(spec.name),
        title=py(spec.title),
        hook=spec.hook,
        cast_line=CAST_LINES[cast],
        forward_doc=FORWARD_DOCS[cast],
        residual=spec.residual,
        residual_line=RESIDUAL_LINES[spec.residual],
        residuals=py(FROZEN_RESIDUALS if spec.residual in FROZEN_RESIDUALS else ("none",)),
        calibration=spec.calibration,
        target_names=py(spec.target_names),
        lr=py(spec.lr),
        quantized_line=_quantized_line(spec),
        fields=fields,
        params=params,
        shape_lines=shape_lines,
        simple_init=simple,
        frags=frags,
        uses_base_weight=base_weight is not None,
        runtime_imports=", ".join(CORES[spec.core].get("runtime", ())),
        select=spec.select,
        input_tensor=SPECTRAL_INPUT.get(spec.basis),  # spectral cores: lora_Vh, or CorDA's lora_P
        input_name=(SPECTRAL_INPUT.get(spec.basis) or "").removeprefix("lora_"),  # Vh or P, for comments
        runtime_knobs=py(tuple(h.name for h in spec.hyperparameters if h.runtime)),
        ranks=py(tuple(h.name for h in spec.hyperparameters if h.rank)),
        # 120 columns less 64 for "BOUNDS = " and the comment after it in module.py.j2
        bounds=_dict_literal({h.name: (h.min, h.max) for h in spec.hyperparameters}, room=120 - 64),
    )


def render(spec, display: str | None = None) -> str:
    """Module source for `spec`, compiled and checked against the allow-list (safety.verify).

    Raises SpecError naming the spec when a value cannot be written safely (safety.UnsafeText)
    or the module holds anything generated code may not; nothing is imported or run.
    """
    display = display or spec.source
    try:
        ctx = context(spec, display)
        text = _env.get_template("module.py.j2").render(**ctx, import_math=True)
        if "math." not in text.split("from lora_lite.config import AdapterConfig", 1)[1]:
            text = _env.get_template("module.py.j2").render(**ctx, import_math=False)  # no unused import
        verify(text)
    except UnsafeText as e:
        raise SpecError([f"{display}: $: generated code refused: {e}"]) from None
    return text


def _identifier(name: str) -> str:
    """A config field name as code: a public lower-case identifier (the schema's rule, checked again)."""
    if not (name.isidentifier() and name.isascii() and name[:1].islower()) or keyword.iskeyword(name):
        raise UnsafeText(f"{name!r} is not a plain identifier")
    return name


def _spec_files(specs_dir: Path) -> list[Path]:
    return sorted(p for p in Path(specs_dir).glob("*.yaml"))


def _display(path: Path) -> str:
    return f"specs/{path.name}"


def _render_all(specs_dir: Path) -> dict[str, str]:
    from .spec import SpecError, load_spec

    out, problems = {}, []
    for path in _spec_files(specs_dir):
        try:
            spec = load_spec(path, display=_display(path))
        except SpecError as e:
            problems += e.problems
            continue
        out[f"{spec.name}.py"] = render(spec)
    if problems:
        raise SpecError(problems)
    return out


INIT_TEXT = '''# Code generated by lora_lite.codegen. DO NOT EDIT.
# Regenerate: just gen    Check: just gen-check
"""One hook module per spec in specs/; see each module's docstring for its math."""
'''


class GenerateError(ValueError):
    """generate() would overwrite a file it did not generate; nothing was written."""


def is_generated(path: Path) -> bool:
    """True for a file this compiler wrote (its first line is the DO NOT EDIT header)."""
    if not Path(path).is_file():  # a folder, FIFO or device is never ours (and a FIFO would block)
        return False
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return first.startswith("# Code generated") and "by lora_lite.codegen. DO NOT EDIT." in first


def generate(specs_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Render every spec in `specs_dir` into `out_dir`; write only changed files, remove orphans.

    Only files carrying the generated header are ever overwritten or removed: a hand-written
    file in `out_dir` with a spec's name raises GenerateError (nothing written), other
    hand-written files are left alone. Each file is written atomically (atomic.write_atomic: a
    temporary file under an unpredictable name, then os.replace), so a concurrent reader or gen
    sees an old or a new file, whole; a symlink at a destination is replaced, never written
    through. Returns the paths written or removed. Raises SpecError listing every bad spec
    (nothing written).
    """
    out_dir = Path(out_dir)
    files = _render_all(Path(specs_dir))
    files["__init__.py"] = INIT_TEXT
    clash = [str(out_dir / n) for n in sorted(files) if (out_dir / n).exists() and not is_generated(out_dir / n)]
    if clash:
        raise GenerateError(f"refusing to overwrite hand-written file(s) {', '.join(clash)}: move them or pick --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    changed = []
    for name, text in sorted(files.items()):
        path = out_dir / name
        if path.is_symlink() or not _holds(path, text):
            write_atomic(path, text)  # a symlink there is replaced by the file, its target untouched
            changed.append(path)
    for path in sorted(out_dir.glob("*.py")):
        if path.name not in files and is_generated(path):
            path.unlink(missing_ok=True)  # a concurrent gen may have removed it first
            changed.append(path)
    return changed


def _holds(path: Path, text: str) -> bool:
    if not path.is_file():
        return False
    try:
        return path.read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):
        return False


def check(specs_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Render in memory; return one line per stale, missing or orphaned file (empty = up to date)."""
    out_dir = Path(out_dir)
    files = _render_all(Path(specs_dir))
    files["__init__.py"] = INIT_TEXT
    problems = []
    for name, text in sorted(files.items()):
        path = out_dir / name
        if not path.exists():
            problems.append(f"missing: {path}")
        elif path.is_symlink() or not _holds(path, text):
            problems.append(f"stale: {path}")
    for path in sorted(out_dir.glob("*.py")):
        if path.name not in files and is_generated(path):
            problems.append(f"orphaned: {path}")
    return problems
