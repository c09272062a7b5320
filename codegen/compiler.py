"""Render validated specs into hook modules under generated/.

    render(spec) -> str            the module text (deterministic; compiled, allow-list checked)
    generate(specs_dir, out_dir)   write changed files, remove orphans; returns changed paths
    check(specs_dir, out_dir)      render in memory; returns stale/missing/orphaned paths

A spec is a composition (algebra.py): each part's code fragments live in its one definition
file, parts/<axis>/<name>.j2. Here the composition's blocks are put in order as the bodies of
init(), forward() and frozen_weight(); templates/module.py.j2 places the finished values. Every
spec value reaches the module through py() (safety.literal), every piece of prose through prose()
(safety.doc_text, or safety.comment_text for a comment); render() runs safety.verify on the result.
"""

from __future__ import annotations

import ast
import keyword
import re
import shlex
import textwrap
from pathlib import Path

from .algebra import ENV, FROZEN_RESIDUALS, reads
from .atomic import write_atomic
from .safety import UnsafeText, comment_text, doc_text, literal, verify
from .shapes import functions_in, parse_shape_expr, to_python
from .spec import SpecError, schema_text

HEADER_CMD = "just gen"  # the regenerate command in the header of every shipped module
CHECK_CMD = "just gen-check"  # and its check command


def commands(specs_dir: str | Path, out_dir: str | Path) -> tuple[str, str]:
    """(regenerate, check) command lines of `lora-lite gen` for a specs and an output folder as
    given on its command line: the header of a module compiled from a user's folder."""
    args = f"--specs {shlex.quote(str(specs_dir))} --out {shlex.quote(str(out_dir))}"
    return f"lora-lite gen {args}", f"lora-lite gen --check {args}"


def py(value) -> str:
    """Python literal for a spec value, quoted as ruff writes it (safety.literal: checked to read back)."""
    return literal(value)


def prose(text: str, comment: bool = False) -> str:
    """Spec prose for a docstring (safety.doc_text) or, with comment=True, a trailing `  # ...`
    comment (safety.comment_text; "" for no text). Raises UnsafeText for text neither may hold."""
    if comment:
        text = comment_text(text)
        return f"  # {text}" if text else ""
    return doc_text(text)


def _dict_literal(d: dict, room: int) -> str:
    """py(d) on one line if it fits in `room` characters, else one item per line (as ruff formats it)."""
    one = py(d)
    if len(one) <= room:
        return one
    return "{\n" + "".join(f"    {py(k)}: {py(v)},\n" for k, v in d.items()) + "}"


def _entry(indent: int, key: str, items: list[str], comment: str = "") -> str:
    """`key: (items),comment` on one line within 120 columns, else one item per line (as ruff
    formats it; a one-item tuple keeps its comma)."""
    pad = " " * indent
    one = f"{pad}{key}: ({', '.join(items)}{',' if len(items) == 1 else ''}),{comment}"
    if len(one) <= 120:
        return one
    return f"{pad}{key}: (\n" + "".join(f"{pad}    {it},\n" for it in items) + f"{pad}),{comment}"


def _dims(shape) -> str:
    return ", ".join(to_python(parse_shape_expr(s), "cfg") for s in shape) + ("," if len(shape) == 1 else "")


def _calls(expr) -> list[str]:
    """Shape functions an expression calls (codegen/shapes.py FUNCTIONS), imported by the module."""
    return functions_in(parse_shape_expr(expr))


def _short(expr) -> str:
    """A shape expression for a comment: d_in -> i, d_out -> o, a call by its first argument."""
    tree = parse_shape_expr(expr)
    if isinstance(tree, ast.Call):  # factor_m(d_out, decompose_factor) -> factor_m(o)
        return f"{tree.func.id}({_short(ast.unparse(tree.args[0]))})"
    return {"d_in": "i", "d_out": "o"}.get(str(expr), str(expr))


def _simple_init(p) -> list[str]:
    dims, key = _dims(p.shape).rstrip(","), f"t[{py(p.name)}]"
    if any(_calls(d) for d in p.shape):  # sizes from shape functions: read them off shapes(), one short line
        dims = f"*shapes(cfg, d_in, d_out)[{py(p.name)}]"
    short = ", ".join(_short(s) for s in p.shape) + ("," if len(p.shape) == 1 else "")
    c = prose(f"({short})", comment=True)
    if p.init in ("zeros", "ones"):
        return [f"    {key} = torch.{p.init}({dims}){c}"]
    if p.init == "constant":
        return [f"    {key} = torch.full(({dims},), {py(p.value)}){c}"]
    if p.init == "kaiming_uniform":
        kaiming = f"    nn.init.kaiming_uniform_({key}, a=math.sqrt(5))  # as nn.Linear (PEFT's lora_A init)"
        return [f"    {key} = torch.empty({dims}){c}", kaiming]
    return []  # basis / core: a part's block computes it


def _docstring(spec, comp) -> str:
    refs = []
    for r in spec.references:
        who = " ".join(b for b in (r.get("authors"), str(r["year"]) if "year" in r else None) if b)
        line = (f"{who}, {r['title']}" if who else r["title"]) + (f", arXiv {r['arxiv']}" if "arxiv" in r else "")
        refs.append(textwrap.fill(line + ".", width=96))
    if spec.reference_impl:
        refs.append(f"Reference implementation: {spec.reference_impl}.")
    formula = [comp.basis.render("formula", **comp.ctx())]
    formula += [p.render("formula", **comp.ctx()) for p, _ in comp.mods.values() if not p.has("wrap")]
    if "update" not in comp.replaced():
        formula.append(comp.core.render("formula", **comp.ctx()))
    if comp.core.meta.get("spectral"):  # h: the core's (..., r) output on the S-scaled coordinates
        formula.append("y = x W_res^T + h U^T        (residual crop: W_res stored in the layer)")
        formula.append(f"y = x W^T + (h - h0) U^T     (residual subtract, h0 = (x {comp.vin}^T) * S: W untouched)")
    formula += [p.render("formula", **comp.ctx()) for p, _ in comp.mods.values() if p.has("wrap")]
    mods = ", ".join(k + "".join(f" {v}" for v in o.values()) for k, (_, o) in comp.mods.items())
    other = {"crop": " (or subtract: cfg.residual)", "subtract": " (or crop: cfg.residual)"}.get(spec.residual, "")
    parts = [
        f"{spec.title}: {spec.summary}",
        "\n".join(refs),
        "Formula (from the composition):\n\n" + textwrap.indent("\n".join(f for f in formula if f), "    "),
        textwrap.indent(spec.math, "    "),
        "Identity at init: " + spec.identity,
        spec.notes,
        textwrap.fill(
            f"Spec: basis={spec.basis}{'+' + comp.select if comp.select else ''}, core={spec.core}, "
            f"modifiers=[{mods}], residual={spec.residual}{other}, hook={spec.hook}.",
            width=96,
        ),
    ]
    return prose("\n\n".join(p for p in parts if p))


def _with_scale(comp, body: str) -> str:
    """Prefix the scale rule's line when the body reads s."""
    scale = comp.mods.get("scale")
    if scale and "s" in reads(body):
        return scale[0].render("scale", **comp.ctx()) + "\n" + body
    return body


def _bodies(spec, comp) -> dict[str, str]:
    """check(), init(), forward() and frozen_weight() bodies, from the parts' blocks in composition order."""
    ctx, core = comp.ctx(), comp.core
    check = core.render("check", **ctx) if core.has("check") else "    return None  # every layer takes it"
    init = ["    check(cfg, d_in, d_out)"] if core.has("check") else []
    init.append("    t = {}")
    init += [line for p in spec.params for line in _simple_init(p)]
    if comp.handoff != "none":
        init.append(comp.basis.render("init", **ctx))
        init.append(core.render(f"init_{comp.handoff}", **ctx))
    if core.meta.get("spectral"):
        init.append("    # frozen basis; crop removes it from W using these values as stored (adapter dtype)")
        init.append(f'    t["lora_U"], t["lora_S"], t["lora_{comp.vin}"] = U, S, {comp.vin}  # (o, r), (r,), (r, i)')
    elif comp.frozen:
        init.append(core.render("init_frozen", **ctx))
    init += [p.render("init", **ctx) for p in comp.all_parts()[1:] if p.has("init")]
    if comp.embedding:  # after the magnitude's init: A = 0 or B = 0 gives the same ||W||_row
        init.append(core.render("init_embedding", **ctx))
    init.append("    return t")
    fwd = [p.render("pre", **ctx) for p, _ in comp.mods.values() if p.has("pre")]
    fwd.append(comp.block("update"))
    wrap = [p for p, _ in comp.mods.values() if p.has("wrap")]
    if wrap:
        factors = textwrap.indent(textwrap.dedent(core.render("factors", **ctx)), " " * 8)
        fwd.append(wrap[0].render("wrap", factors=factors, **ctx))
    elif core.meta.get("additive", True) is True or comp.hook in (core.meta.get("additive") or ()):
        fwd.append("    return y + delta.to(y.dtype)  # (..., o)")
    if core.meta.get("spectral"):
        frozen = f"    return (m.lora_U.float() * m.lora_S.float()) @ m.lora_{comp.vin}.float()  # (o, i)"
    elif comp.frozen:
        frozen = core.render("frozen", **ctx)
    else:
        frozen = f"    raise ValueError({py(spec.name + ' has no frozen part (residual none)')})"
    shared = core.render("shared", **ctx) if comp.shared() else "    return {}"
    join = lambda xs: "\n".join(x for x in xs if x)  # noqa: E731
    bodies = (("init", join(init)), ("forward", join(fwd)), ("frozen", frozen), ("shared", shared))
    return {"check": check} | {k: _with_scale(comp, v) for k, v in bodies}


# The comment after each contract constant (lora_lite.Variant), by its value.
COMMENTS = {
    ("HOOK", "output"): "forward hook: forward() returns the layer's new output",
    ("HOOK", "input"): "forward pre-hook: forward() returns the layer's new input",
    ("CAST_INPUT", True): "the hook casts x to cfg.dtype for forward() (an input hook casts the result back)",
    ("CAST_INPUT", False): "forward() works in the layer's dtype: the hook casts nothing",
    ("RESIDUAL", "none"): "the base weight is never modified",
    ("RESIDUAL", "crop"): "default: while attached the base weight holds W_res = W - frozen_weight()",
    ("RESIDUAL", "subtract"): "default: W is never modified; forward() takes frozen_weight() x out",
    ("CALIBRATION", "required"): "attach raises without calibration data",
    ("CALIBRATION", "optional"): "calibration data refines the basis when given",
    ("CALIBRATION", "none"): "calibration data is accepted and ignored",
    ("QUANTIZED_BASE", False): "attach refuses bitsandbytes 4/8-bit targets",
    ("QUANTIZED_BASE", True): "bitsandbytes 4/8-bit targets work (with residual subtract where W is cropped)",
    ("USES_BASE_WEIGHT", True): "the math reads W: load refuses a base whose weights differ",
    ("USES_BASE_WEIGHT", False): "the math never reads W after init",
    ("EMBEDDING", True): "nn.Embedding targets work (token ids in; PEFT's layout and init)",
    ("EMBEDDING", False): "attach refuses nn.Embedding targets",
}


READS = "the layer's own reads: W through its forward (float or 4/8-bit), an nn.Embedding's token lookup"
RUNTIME_COMMENTS = {  # runtime helper -> what the comment over its import says
    **dict.fromkeys(("base_forward", "base_row_sqnorm", "embedding_lookup", "is_embedding"), READS),
    "hadamard_product": "(w1_a w1_b) * (w2_a w2_b) with a backward that recomputes both products",
    "kronecker_apply": "x (w1 (x) w2_a w2_b)^T with a backward that recomputes the per-token products",
}


def _statistics(init: str) -> tuple[str, ...]:
    """The (i, i) calibration statistics an init() body reads (`stats["second_moment"]`), sorted;
    "mean", "tokens" and "sequences" always come with them (lora_lite.calibration)."""
    return tuple(sorted(set(re.findall(r"""stats\[["'](\w+)["']\]""", init)) - {"mean", "tokens", "sequences"}))


def context(spec, display: str, regen: str = HEADER_CMD, check_cmd: str = CHECK_CMD) -> dict:
    """Everything the module template needs, as finished strings and lists."""
    comp = spec.composition()
    cast = comp.core.meta.get("cast_input", True)
    bodies = _bodies(spec, comp)
    read = reads(bodies["forward"])  # a part's runtime helper is imported where the code calls it
    runtime = sorted({f for p in comp.all_parts() for f in p.meta.get("runtime", ()) if f in read})
    return dict(
        regen=comment_text(regen),
        check_cmd=comment_text(check_cmd),
        docstring=_docstring(spec, comp),
        source=comment_text(display),
        config_doc=prose(f"{spec.title} hyperparameters (defaults from {display})."),
        hook=spec.hook,
        cast=cast,
        embedding=comp.embedding,
        constants=[
            (k, py(v), COMMENTS.get((k, v), what) if not isinstance(v, dict) else what)
            for k, v, what in (
                ("NAME", spec.name, "the spec's name"),
                ("TITLE", spec.title, "its title"),
                ("HOOK", spec.hook, ""),
                ("CAST_INPUT", cast, ""),
                ("RESIDUAL", spec.residual, ""),
                ("RESIDUALS", FROZEN_RESIDUALS if comp.frozen else ("none",), "the values cfg.residual may take"),
                ("CALIBRATION", comp.calibration, ""),
                ("STATISTICS", _statistics(bodies["init"]), "what init() reads from stats: calibration gathers these"),
                ("TARGET_NAMES", spec.target_names, "default targets: re.search on module names"),
                ("LR", spec.lr, "recommended AdamW learning rate"),
                ("QUANTIZED_BASE", spec.quantized_base, ""),
                ("USES_BASE_WEIGHT", any(p.meta.get("base_weight") for p in comp.all_parts()), ""),
                ("PER_RANK", comp.per_rank(), "read over r ** e: clamping r to r_c scales it by (r_c / r) ** e"),
                ("EMBEDDING", comp.embedding, ""),
                ("SHARED", comp.shared(), "tensors kept once per adapter for every target (frozen; see shared())"),
            )
        ],
        fields=[
            (_identifier(h.name), PYTYPE[h.type], py(h.default), prose(h.doc, comment=True))
            for h in spec.hyperparameters
        ],
        params=[
            _entry(4, py(p.name), [py(tuple(p.shape)), py(p.init), py(p.trainable)], prose(p.doc or "", comment=True))
            for p in spec.params
        ],
        shape_lines=[_entry(8, py(p.name), _dims(p.shape).rstrip(",").split(", ")) for p in spec.params],
        runtime_imports=", ".join(runtime),
        runtime_comment="; ".join(dict.fromkeys(RUNTIME_COMMENTS[f] for f in runtime)),
        shape_imports=", ".join(sorted({f for p in spec.params for d in p.shape for f in _calls(d)})),
        runtime_knobs=py(tuple(h.name for h in spec.hyperparameters if h.runtime)),
        ranks=py(tuple(h.name for h in spec.hyperparameters if h.rank)),
        # 120 columns less 64 for "BOUNDS = " and the comment after it in module.py.j2
        bounds=_dict_literal({h.name: (h.min, h.max) for h in spec.hyperparameters}, room=120 - 64),
        **bodies,
    )


def render(spec, display: str | None = None, regen: str = HEADER_CMD, check_cmd: str = CHECK_CMD) -> str:
    """Module source for `spec`, compiled and checked against the allow-list (safety.verify).
    The header names `display` (default: the spec's source) and the `regen` and `check_cmd` commands.

    Raises SpecError naming the spec when a value cannot be written safely (safety.UnsafeText)
    or the module holds anything generated code may not; nothing is imported or run.
    """
    display = display or spec.source
    try:
        ctx = context(spec, display, regen, check_cmd)
        body = "\n".join(ctx[k] for k in ("init", "forward", "frozen", "shared"))
        text = ENV.get_template("module.py.j2").render(**ctx, import_math=bool(re.search(r"\bmath\.", body)))
        verify(text)
    except UnsafeText as e:
        raise SpecError([f"{display}: $: generated code refused: {e}"]) from None
    return text


PYTYPE = {"int": "int", "float": "float", "bool": "bool"}  # a hyperparameter's type, as code


def _identifier(name: str) -> str:
    """A config field name as code: a public lower-case identifier (the schema's rule, checked again)."""
    if not (name.isidentifier() and name.isascii() and name[:1].islower()) or keyword.iskeyword(name):
        raise UnsafeText(f"{name!r} is not a plain identifier")
    return name


def _spec_files(specs_dir: Path) -> list[Path]:
    return sorted(p for p in Path(specs_dir).glob("*.yaml"))


def _render_all(specs_dir: Path, out_dir: Path, shipped: bool) -> dict[str, str]:
    """Module text by file name, plus __init__.py. Shipped: headers name `specs/<file>` and
    `just gen`; else the spec file and the `lora-lite gen` command as given (commands())."""
    from .spec import SpecError, load_spec

    regen, check_cmd = (HEADER_CMD, CHECK_CMD) if shipped else commands(specs_dir, out_dir)
    out, problems = {}, []
    for path in _spec_files(specs_dir):
        try:
            spec = load_spec(path, display=f"specs/{path.name}" if shipped else str(path))
        except SpecError as e:
            problems += e.problems
            continue
        out[f"{spec.name}.py"] = render(spec, regen=regen, check_cmd=check_cmd)
    if problems:
        raise SpecError(problems)
    out["__init__.py"] = _init_text(regen, check_cmd, "spec in specs/" if shipped else "spec file")
    return out


def _schema(specs_dir) -> tuple[Path, bool]:
    """specs_dir/schema.json and whether its enums differ from the part definitions."""
    schema = Path(specs_dir) / "schema.json"
    if not schema.is_file():
        return schema, False
    text = schema.read_text(encoding="utf-8")
    return schema, schema_text(text) != text


def _init_text(regen: str, check_cmd: str, each: str) -> str:
    """__init__.py of an output folder: the header (the shipped `just gen` commands, or a user's
    `lora-lite gen` ones) and a docstring saying what each module comes from. Raises SpecError
    for a command that cannot be one comment line (a folder name with a line break)."""
    try:
        head = f"# Regenerate: {comment_text(regen)}    Check: {comment_text(check_cmd)}"
    except UnsafeText as e:
        raise SpecError([f"--specs/--out: cannot be written into a header comment: {e}"]) from None
    doc = f'"""One hook module per {each}; see each module\'s docstring for its math."""'
    return f"# Code generated by lora_lite.codegen. DO NOT EDIT.\n{head}\n{doc}\n"


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


def generate(specs_dir: str | Path, out_dir: str | Path, shipped: bool = True) -> list[Path]:
    """Render every spec in `specs_dir` into `out_dir`; write only changed files, remove orphans.

    Only files carrying the generated header are ever overwritten or removed: a hand-written
    file in `out_dir` with a spec's name raises GenerateError (nothing written), other
    hand-written files are left alone. Each file is written atomically (atomic.write_atomic: a
    temporary file under an unpredictable name, then os.replace), so a concurrent reader or gen
    sees an old or a new file, whole; a symlink at a destination is replaced, never written
    through. The schema's enums are rewritten from the part definitions the same way. Returns
    the paths written or removed. Raises SpecError listing every bad spec (nothing written).
    `shipped=False`: headers name each spec file and the `lora-lite gen` command as given (a
    user's folder); True: `specs/<file>` and `just gen`, the checked-in generated/.
    """
    out_dir = Path(out_dir)
    files = _render_all(Path(specs_dir), out_dir, shipped)
    schema, stale_schema = _schema(specs_dir)
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
    if stale_schema:  # its enums come from the part definitions
        write_atomic(schema, schema_text(schema.read_text(encoding="utf-8")))
        changed.append(schema)
    return changed


def _holds(path: Path, text: str) -> bool:
    if not path.is_file():
        return False
    try:
        return path.read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):
        return False


def check(specs_dir: str | Path, out_dir: str | Path, shipped: bool = True) -> list[str]:
    """Render in memory (headers as generate() with the same `shipped`); return one line per
    stale, missing or orphaned file (empty = up to date)."""
    out_dir = Path(out_dir)
    files = _render_all(Path(specs_dir), out_dir, shipped)
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
    schema, stale_schema = _schema(specs_dir)
    if stale_schema:
        problems.append(f"stale: {schema} (enums differ from codegen/parts)")
    return problems
