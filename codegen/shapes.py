"""Safe evaluator for shape expressions in specs (`r`, `d_out`, `r - block`, `2 * r`).

Only names, non-negative integer literals, unary minus and the operators + - * // are
allowed, and // only by a positive integer literal or a bare hyperparameter name (the spec
checker requires that hyperparameter's `min` to be at least 1, so no size divides by zero
whatever the values). The one other form is a call of a function in FUNCTIONS by its bare
name with its exact number of plain arguments (`factor_m(d_out, decompose_factor)`): pure,
bounded integer functions defined here, which generated modules import from this module.
Anything else (other calls, keywords, attributes, strings, `**`) is refused. Nothing reaches
`eval`.
"""

from __future__ import annotations

import ast
import copy
import math
from functools import lru_cache

_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
}


# The largest dimension a shape function takes (the spec checker's bound on a size).
MAX_FACTOR_DIM = 2**31


@lru_cache(maxsize=1024)
def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dim, the Kronecker factor sizes of LoKr (PEFT's `factorization`).

    factor > 0 dividing dim: (factor, dim // factor). Otherwise m runs up the divisors of dim
    while m < dim / m and the next divisor is at most `factor` (-1: no limit), and the pair
    comes back smaller first: with -1, m is the largest divisor <= sqrt(dim) (256 -> (16, 16),
    128 -> (8, 16), 127 -> (1, 127)). Same results as peft/tuners/lokr/layer.py::factorization
    (from LyCORIS), in O(sqrt(dim)) steps where that walks every integer up to sqrt(dim) and
    beyond. Raises ValueError for dim outside [1, 2**31] or a non-int argument.
    """
    if type(dim) is not int or type(factor) is not int:
        raise ValueError(f"factorization takes integers, got {type(dim).__name__}, {type(factor).__name__}")
    if not 1 <= dim <= MAX_FACTOR_DIM:
        raise ValueError(f"factorization: dimension {dim} is outside [1, 2**31]")
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    q = next(d for d in range(math.isqrt(dim), 0, -1) if dim % d == 0)  # largest divisor <= sqrt(dim)
    s = dim // q  # smallest divisor >= sqrt(dim): where PEFT's walk stops unless the limit stops it first
    if limit >= s:
        m = s
    elif limit >= q:
        m = q  # no divisor lies strictly between q and s
    else:
        m = next(d for d in range(max(limit, 1), 0, -1) if dim % d == 0)  # largest divisor <= limit
    return min(m, dim // m), max(m, dim // m)


def factor_m(dim: int, factor: int) -> int:
    """First Kronecker factor of `dim`: factorization(dim, factor)[0] (LoKr's in_m, out_l)."""
    return factorization(dim, factor)[0]


def factor_n(dim: int, factor: int) -> int:
    """Second Kronecker factor of `dim`: factorization(dim, factor)[1] (LoKr's in_n, out_k)."""
    return factorization(dim, factor)[1]


# Functions a shape expression may call: name -> (function, number of arguments).
FUNCTIONS = {"factor_m": (factor_m, 2), "factor_n": (factor_n, 2)}


def parse_shape_expr(text: str | int) -> ast.expr:
    """Parse one shape expression and check it uses only the allowed syntax.

    Raises ValueError naming the offending piece, e.g. "call 'f(r)' is not allowed".
    """
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f"expected a string or integer, got {type(text).__name__}")
    try:
        tree = ast.parse(str(text), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse {text!r}: {e.msg}") from None
    called = {id(n.func) for n in ast.walk(tree.body) if isinstance(n, ast.Call)}
    for node in ast.walk(tree.body):
        if isinstance(node, ast.Call):
            f = node.func
            if not (isinstance(f, ast.Name) and f.id in FUNCTIONS):
                raise ValueError(f"call {ast.unparse(node)!r} is not allowed (only {', '.join(FUNCTIONS)})")
            arity = FUNCTIONS[f.id][1]
            if node.keywords or len(node.args) != arity or any(isinstance(a, ast.Starred) for a in node.args):
                raise ValueError(f"{ast.unparse(node)!r}: {f.id} takes {arity} plain arguments")
            continue
        if isinstance(node, ast.Name) and node.id in FUNCTIONS and id(node) not in called:
            raise ValueError(f"{node.id!r} is a function: call it, {node.id}(...)")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.FloorDiv):
            r = node.right
            literal = isinstance(r, ast.Constant) and type(r.value) is int and r.value > 0
            if not (literal or (isinstance(r, ast.Name) and r.id not in ("d_in", "d_out"))):
                raise ValueError(
                    f"{ast.unparse(node)!r}: // divides only by a positive integer or a hyperparameter name"
                )
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            continue
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            continue
        if isinstance(node, ast.Constant) and type(node.value) is int:
            continue
        if isinstance(node, (ast.operator, ast.unaryop, ast.expr_context)):
            continue
        allowed = f"only names, integers, + - * //, {', '.join(FUNCTIONS)}"
        raise ValueError(f"{ast.unparse(node)!r} is not allowed ({allowed})")
    return tree.body


def names_in(expr: ast.expr) -> list[str]:
    """Names used by a parsed shape expression, in order of appearance (called functions excluded)."""
    called = {id(n.func) for n in ast.walk(expr) if isinstance(n, ast.Call)}
    return [n.id for n in ast.walk(expr) if isinstance(n, ast.Name) and id(n) not in called]


def functions_in(expr: ast.expr) -> list[str]:
    """FUNCTIONS a parsed shape expression calls (`factor_m(d_in, f)` -> [factor_m])."""
    return [n.func.id for n in ast.walk(expr) if isinstance(n, ast.Call)]


def divisors(expr: ast.expr) -> list[str]:
    """Hyperparameter names a parsed expression divides by (`d_in // oft_block_size` -> [oft_block_size])."""
    return [
        n.right.id
        for n in ast.walk(expr)
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.FloorDiv) and isinstance(n.right, ast.Name)
    ]


def eval_shape_expr(expr: ast.expr, env: dict[str, int]) -> int:
    """Evaluate a parsed expression with integer bindings.

    Raises KeyError naming an unknown name, ValueError for a division by zero or a function
    argument out of its range.
    """
    if isinstance(expr, ast.Constant):
        return expr.value
    if isinstance(expr, ast.Name):
        if expr.id not in env:
            raise KeyError(expr.id)
        return int(env[expr.id])
    if isinstance(expr, ast.UnaryOp):
        return -eval_shape_expr(expr.operand, env)
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id in FUNCTIONS:
        fn, arity = FUNCTIONS[expr.func.id]
        if len(expr.args) != arity or expr.keywords:
            raise ValueError(f"{ast.unparse(expr)!r}: {expr.func.id} takes {arity} arguments")
        return fn(*(eval_shape_expr(a, env) for a in expr.args))
    if isinstance(expr, ast.BinOp):
        try:
            return _OPS[type(expr.op)](eval_shape_expr(expr.left, env), eval_shape_expr(expr.right, env))
        except ZeroDivisionError:
            raise ValueError(f"division by zero in {ast.unparse(expr)!r}") from None
    raise ValueError(f"{ast.unparse(expr)!r} is not allowed")


def to_python(expr: ast.expr, prefix: str, dims: tuple[str, ...] = ("d_in", "d_out")) -> str:
    """Render an expression as Python source; hyperparameter names become `<prefix>.<name>`.

    `r - block` -> `cfg.r - cfg.block`; `d_in` stays `d_in`; a called function keeps its name
    (the module imports it from here). Input must come from `parse_shape_expr`, so the output
    holds only names, integers, + - * // and calls of FUNCTIONS.
    """

    class _Rename(ast.NodeTransformer):
        def visit_Call(self, node: ast.Call) -> ast.AST:
            node.args = [self.visit(a) for a in node.args]  # the function's own name is not renamed
            return node

        def visit_Name(self, node: ast.Name) -> ast.AST:
            return node if node.id in dims else ast.Attribute(ast.Name(prefix, ast.Load()), node.id, ast.Load())

    return ast.unparse(_Rename().visit(copy.deepcopy(expr)))
