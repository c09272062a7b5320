"""The only ways spec data enters a generated module, and the check every module passes.

    literal(value) -> str       Python source for a str/int/float/bool/None (or a tuple/dict of
                                them), quoted as ruff writes it, read back with ast.literal_eval
    doc_text(text) -> str       prose for a docstring: backslashes and quotes that could close it
                                are escaped; the one escaping function for docstrings
    comment_text(text) -> str   prose for a trailing `# ...` comment: one checked line, unchanged
    verify(text)                compile the module and check it against the allow-list below
    regex_problem(rx) -> str    why a target regex could backtrack for minutes, or None

A spec is data from possibly untrusted hands (checkpoints carry their spec text). Templates never
put spec text between quotes or after `#` themselves: the compiler passes every value through
one of the functions above, then `verify` refuses any module that could do more at import than
define constants, the Config dataclass and functions. Each raises UnsafeText (a ValueError) with
a one-line message; the compiler turns it into a SpecError naming the spec.
"""

from __future__ import annotations

import ast
import math
import re
import unicodedata

from .shapes import FUNCTIONS as SHAPE_FUNCTIONS

try:  # the regex parser re.compile uses (Python 3.11+; sre_parse before)
    import re._parser as _sre
except ImportError:  # pragma: no cover
    import sre_parse as _sre  # type: ignore[no-redef]

# Characters no spec text may hold: C0 controls but LF, DEL, C1 controls (U+0085 NEL among them),
# the Unicode line and paragraph separators, bidirectional overrides (text that displays in an
# order other than the one Python reads), the byte-order mark and lone surrogates.
FORBIDDEN = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff\ud800-\udfff]")


# A target regex runs (re.search) on every module name of the model. Backtracking makes a repeat
# of a group that can match in several ways (`([a-z.]+)+!`, `(a|a)*x`) exponential in the name's
# length and each unbounded repeat another factor of it, so a spec from untrusted hands could hang
# attach for hours. Repeats may only repeat one character class, at most MAX_REGEX_REPEATS of them.
MAX_REGEX_REPEATS = 3
_ONE_CHAR = {_sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY, _sre.IN, _sre.CATEGORY}
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", _sre.MAX_REPEAT)}


def regex_problem(rx: str) -> str | None:
    """Why `rx` could take exponential or high-polynomial time on a module name, or None.

    Refuses a repeat (`*`, `+`, `{m,n}` with n > 1) of anything but one character class
    (`.*`, `\\d+`, `[a-z_]+` are fine; `(ab)+`, `(q|v)*`, `(a+)+` are not) and more than
    MAX_REGEX_REPEATS unbounded repeats. A pattern re.compile rejects gives None (reported
    separately, with re's message).
    """
    try:
        parsed = _sre.parse(rx)
    except (re.error, OverflowError, RecursionError):
        return None
    unbounded = 0
    stack = [list(parsed)]
    while stack:
        for op, av in stack.pop():
            if op in _REPEATS:
                lo, hi, sub = av
                body = list(sub)
                if hi != 1 and not (len(body) == 1 and body[0][0] in _ONE_CHAR):
                    return "a repeated group can backtrack exponentially; repeat only one character class"
                unbounded += hi == _sre.MAXREPEAT
                stack.append(body)
            elif op == _sre.SUBPATTERN:
                stack.append(list(av[-1]))
            elif op == _sre.BRANCH:
                stack.extend(list(b) for b in av[1])
            elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
                stack.append(list(av[1]))
            elif op == getattr(_sre, "ATOMIC_GROUP", None):
                stack.append(list(av))
            elif op == _sre.GROUPREF_EXISTS:
                stack.extend(list(b) for b in av[1:] if b is not None)
    if unbounded > MAX_REGEX_REPEATS:
        return f"{unbounded} unbounded repeats (at most {MAX_REGEX_REPEATS}): matching could take minutes"
    return None


class UnsafeText(ValueError):
    """A value the compiler will not put into generated code (one-line message)."""


def describe_char(c: str) -> str:
    """'U+2028 LINE SEPARATOR', 'U+000D (a control character)'."""
    name = unicodedata.name(c, "") if not 0xD800 <= ord(c) <= 0xDFFF else "lone surrogate"
    return f"U+{ord(c):04X} {name or '(a control character)'}"


def forbidden_char(text: str, allow_newline: bool = True) -> str | None:
    """Description and offset of the first character `text` may not hold, or None."""
    bad = FORBIDDEN.search(text)
    if bad is None and not allow_newline and "\n" in text:
        return f"a line break at offset {text.index(chr(10))}"
    if bad is None:
        return None
    return f"{describe_char(bad.group())} at offset {bad.start()}"


# ---- literals ------------------------------------------------------------------------------


def _str_literal(s: str) -> str:
    # Escape each character as repr does, in double quotes unless single quotes need fewer escapes
    # (ruff's rule, so the output is format-clean).
    quote = "'" if s.count("'") < s.count('"') else '"'
    out = []
    for c in s:
        if c == quote or c == "\\":
            out.append("\\" + c)
        elif c in "'\"":
            out.append(c)
        else:
            out.append(repr(c)[1:-1])  # printable: itself; else \n, \x85, \u2028, \ud800, ...
    return quote + "".join(out) + quote


def _source(value) -> str:
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UnsafeText(f"{value!r} is not a finite number")
        return repr(value)
    if isinstance(value, str):
        return _str_literal(value)
    if isinstance(value, tuple):
        inner = ", ".join(_source(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise UnsafeText(f"dict keys must be strings, got {sorted(type(k).__name__ for k in value)}")
        return "{" + ", ".join(f"{_source(k)}: {_source(v)}" for k, v in value.items()) + "}"
    raise UnsafeText(f"cannot write a {type(value).__name__} as a literal")


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


def literal(value) -> str:
    """Python source for `value`, checked: ast.literal_eval of the result equals `value` exactly.

    Accepts None, bool, int, float (finite), str, and tuples/dicts (str keys) of these; ints and
    floats stay distinct (1 is not 1.0), bools are not numbers. Strings are double-quoted unless
    single quotes need fewer escapes, as ruff formats them. Raises UnsafeText otherwise.
    """
    try:
        src = _source(value)
        back = ast.literal_eval(src)
    except (ValueError, SyntaxError, RecursionError, MemoryError) as e:
        if isinstance(e, UnsafeText):
            raise
        raise UnsafeText(f"cannot write {type(value).__name__} value as a literal: {e}") from None
    if not _same(back, value):
        raise UnsafeText(f"literal {src[:60]!r} does not read back as the value")
    return src


# ---- prose -----------------------------------------------------------------------------------


def doc_text(text: str) -> str:
    """Prose as it may stand inside a triple-double-quoted docstring, read back as `text`.

    Backslashes are doubled; a double quote is escaped where it starts or ends the text or is
    followed by another (so no run of three can close the docstring, and no docstring starts or
    ends with a bare quote, which a formatter would pad). Trailing spaces on each line are dropped
    (formatters drop them too). Raises UnsafeText for any FORBIDDEN character.
    """
    bad = forbidden_char(text)
    if bad:
        raise UnsafeText(f"text holds {bad}: prose may not contain control characters or line separators")
    text = "\n".join(line.rstrip(" ") for line in text.split("\n"))
    text = text.replace("\\", "\\\\")
    return re.sub(r'\A"|"(?=")|"\Z', r'\\"', text)


def comment_text(text: str) -> str:
    """One line of prose for a trailing `# ...` comment: returned without trailing spaces.

    A comment ends only at a line break, so refusing every line break and control character is all
    it takes. Raises UnsafeText otherwise.
    """
    bad = forbidden_char(text, allow_newline=False)
    if bad:
        raise UnsafeText(f"comment text holds {bad}: it must be one line without control characters")
    return text.rstrip(" ")


# ---- the allow-list --------------------------------------------------------------------------

# Imports a generated module may make: module -> names (None: `import module`).
IMPORTS = {
    "__future__": {"annotations"},
    "math": None,
    "dataclasses": {"dataclass"},
    "torch": None,
    ("torch", "from"): {"Tensor", "nn"},
    "lora_lite.config": {"AdapterConfig"},
    "lora_lite.runtime": {
        "base_forward",
        "base_row_sqnorm",
        "embedding_lookup",
        "hadamard_product",
        "is_embedding",
        "kronecker_apply",
    },
    "lora_lite.codegen.shapes": set(SHAPE_FUNCTIONS),  # pure integer sizes (factor_m, factor_n)
}
# First-level attributes of the imported modules that function bodies and annotations may use.
# torch: tensor construction and math only (no torch.load, torch.hub, torch.utils, torch.ops, ...).
MODULE_ATTRS = {
    "torch": {
        *("Tensor", "float16", "float32", "float64", "bfloat16", "promote_types", "no_grad", "finfo"),
        *("zeros", "ones", "full", "empty", "eye", "arange", "zeros_like", "ones_like", "empty_like"),
        *("where", "cat", "stack", "outer", "triu", "tril", "diag", "diag_embed", "einsum", "matmul"),
        *("sqrt", "rsqrt", "exp", "log", "sigmoid", "tanh", "abs", "sign", "clamp", "minimum", "maximum"),
        *("linalg", "randn", "rand", "rand_like", "randn_like", "cos", "sin", "softmax", "svd_lowrank"),
        *("dist", "triu_indices", "Generator"),
    },
    "nn": {"Module", "Linear", "Parameter", "functional", "init"},
    "math": {"sqrt", "pi", "e", "log", "exp", "inf", "isfinite", "prod"},
}
# Builtins function bodies and annotations may name (no eval, exec, open, __import__, globals, ...).
# getattr is allowed only as getattr(obj, "<public name>", default).
BUILTINS = {
    *("None", "True", "False", "int", "float", "bool", "str", "tuple", "list", "dict"),
    *("min", "max", "abs", "len", "range", "sum", "round", "enumerate", "zip", "sorted", "reversed", "any", "all"),
    *("isinstance", "getattr", "ValueError", "RuntimeError", "TypeError", "NotImplementedError", "AssertionError"),
}
# The one call allowed at module level: the Config decorator.
_DECORATOR = "dataclass(frozen=True)"
_CONSTANT = re.compile(r"[A-Z][A-Z0-9_]*\Z")
_FUNCTION = re.compile(r"[a-z][a-z0-9_]*\Z")
_FIELD_TYPES = {"int", "float", "bool"}
# Statements and expressions no generated function may hold.
_BANNED = (
    ast.Import,
    ast.ImportFrom,
    ast.Global,
    ast.Nonlocal,
    ast.Lambda,
    ast.ClassDef,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.Await,
    ast.Yield,
    ast.YieldFrom,
    ast.Delete,
)


def _is_literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return False
    return True


def _import_problem(node: ast.Import | ast.ImportFrom) -> str | None:
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.asname or a.name not in IMPORTS or IMPORTS[a.name] is not None:
                return f"import {a.name} is not allowed"
        return None
    allowed = IMPORTS.get((node.module, "from"), IMPORTS.get(node.module))
    if node.level or not allowed:
        return f"from {'.' * node.level}{node.module} import ... is not allowed"
    for a in node.names:
        if a.asname or a.name not in allowed:
            return f"from {node.module} import {a.name} is not allowed"
    return None


def _config_problem(node: ast.ClassDef) -> str | None:
    if node.name != "Config":
        return f"class {node.name} is not allowed (only Config)"
    if [ast.unparse(d) for d in node.decorator_list] != [_DECORATOR]:
        return f"class Config must be decorated with exactly @{_DECORATOR}"
    if [ast.unparse(b) for b in node.bases] != ["AdapterConfig"] or node.keywords:
        return "class Config must derive from AdapterConfig only"
    body = node.body[1:] if _docstring(node.body) else node.body
    for stmt in body:
        ok = (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and _FUNCTION.match(stmt.target.id)
            and isinstance(stmt.annotation, ast.Name)
            and stmt.annotation.id in _FIELD_TYPES
            and stmt.value is not None
            and _is_literal(stmt.value)
        )
        if not ok:
            return f"Config line {stmt.lineno}: only `name: int|float|bool = <literal>` fields are allowed"
    return None


def _docstring(body: list[ast.stmt]) -> bool:
    return bool(body) and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)


def _names_stored(fn: ast.FunctionDef) -> set[str]:
    args = fn.args
    names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    names |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
    for n in ast.walk(fn):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
    return names


def _expr_problem(node: ast.AST, known: set[str], modules: set[str], annotation: bool = False) -> str | None:
    """What is wrong with a function body or annotation, or None."""
    module_uses = {id(n.value) for n in ast.walk(node) if isinstance(n, ast.Attribute)}
    for n in ast.walk(node):
        line = getattr(n, "lineno", "?")
        if isinstance(n, _BANNED) or (annotation and isinstance(n, ast.Call)):
            return f"line {line}: {type(n).__name__} is not allowed in a generated function"
        if isinstance(n, ast.Name) and n.id in modules and id(n) not in module_uses:
            return f"line {line}: module {n.id!r} may only be used as {n.id}.<allowed attribute>"
        if isinstance(n, ast.Attribute):
            if n.attr.startswith("_"):
                return f"line {line}: attribute {n.attr!r} is not allowed (private or dunder)"
            if isinstance(n.value, ast.Name) and n.value.id in modules:
                mod = "nn" if n.value.id == "nn" else n.value.id
                if n.attr not in MODULE_ATTRS.get(mod, ()):
                    return f"line {line}: {n.value.id}.{n.attr} is not on the allow-list"
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in known:
            return f"line {line}: name {n.id!r} is not defined by the module or allowed"
        if isinstance(n, ast.Name) and n.id.startswith("_") and n.id != "_":
            return f"line {line}: name {n.id!r} is not allowed (private or dunder)"
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "getattr":
            obj, name = (n.args + [None, None])[:2]
            if not (
                isinstance(name, ast.Constant) and isinstance(name.value, str) and name.value.isidentifier()
            ) or name.value.startswith("_"):
                return f"line {line}: getattr needs a constant public attribute name"
            if isinstance(obj, ast.Name) and obj.id in modules:
                return f"line {line}: getattr on module {obj.id!r} is not allowed"
    return None


def _function_problem(fn: ast.FunctionDef, globals_: set[str], modules: set[str]) -> str | None:
    if not _FUNCTION.match(fn.name):
        return f"def {fn.name} is not allowed (public lower-case names only)"
    if fn.decorator_list:
        return f"def {fn.name}: decorators are not allowed"
    defaults = fn.args.defaults + [d for d in fn.args.kw_defaults if d is not None]
    if not all(_is_literal(d) for d in defaults):
        return f"def {fn.name}: default values must be literals"
    known = globals_ | BUILTINS | _names_stored(fn)
    args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs + [fn.args.vararg, fn.args.kwarg]
    for part in fn.body:
        why = _expr_problem(part, known, modules)
        if why:
            return f"def {fn.name}, {why}"
    for part in [a.annotation for a in args if a is not None] + [fn.returns]:
        why = part is not None and _expr_problem(part, known, modules, annotation=True)
        if why:
            return f"def {fn.name}, annotation {why}"
    return None


def verify(text: str) -> None:
    """Compile a generated module and check it holds only what generated code may hold.

    Top level: the module docstring; the imports in IMPORTS; assignments of literals to UPPER_CASE
    names; `@dataclass(frozen=True) class Config(AdapterConfig)` with `name: type = literal` fields;
    `def` of public lower-case functions without decorators and with literal defaults. Inside
    functions: names the module defines, its arguments and locals, BUILTINS; attributes of torch,
    nn and math from MODULE_ATTRS (a module name only as `torch.<attribute>`); no private or
    dunder attribute; no import, global, lambda, nested def or class; annotations without calls
    (and never evaluated: the module must import annotations from __future__). Importing such a
    module runs nothing but these definitions. The checks on function bodies narrow what they
    can name but are no sandbox: spec data stays out of code because it enters only through
    literal(), doc_text() and comment_text(). Raises UnsafeText naming the line and the rule.
    """
    try:
        compile(text, "<generated>", "exec", dont_inherit=True)
        tree = ast.parse(text)
    except (SyntaxError, ValueError) as e:
        raise UnsafeText(f"generated code does not compile (line {getattr(e, 'lineno', '?')}): {e}") from None
    body = tree.body[1:] if _docstring(tree.body) else tree.body
    modules: set[str] = set()
    globals_: set[str] = set()
    seen: set[str] = set()
    functions = []
    for node in body:
        where = f"line {node.lineno}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            why = _import_problem(node)
            if why:
                raise UnsafeText(f"{where}: {why}")
            for a in node.names:
                globals_.add(a.name)
                if a.name in ("torch", "math", "nn"):
                    modules.add(a.name)
            continue
        if isinstance(node, ast.Assign):
            target = node.targets[0] if len(node.targets) == 1 else None
            if not (isinstance(target, ast.Name) and _CONSTANT.match(target.id)):
                raise UnsafeText(f"{where}: only assignments to one UPPER_CASE name are allowed")
            if not _is_literal(node.value):
                raise UnsafeText(f"{where}: {target.id} must be assigned a literal")
            name = target.id
        elif isinstance(node, ast.ClassDef):
            why = _config_problem(node)
            if why:
                raise UnsafeText(f"{where}: {why}")
            name = node.name
        elif isinstance(node, ast.FunctionDef):
            functions.append(node)
            name = node.name
        else:
            raise UnsafeText(f"{where}: a top-level {type(node).__name__} statement is not allowed")
        if name in seen or name in globals_:
            raise UnsafeText(f"{where}: {name} is defined twice")
        seen.add(name)
    if "annotations" not in globals_:  # without it, annotations would be evaluated at import
        raise UnsafeText("the module must start with `from __future__ import annotations`")
    globals_ |= seen
    for fn in functions:
        why = _function_problem(fn, globals_, modules)
        if why:
            raise UnsafeText(f"line {fn.lineno}: {why}")
