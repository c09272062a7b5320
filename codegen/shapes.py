"""Safe evaluator for shape expressions in specs (`r`, `d_out`, `r - block`, `2 * r`).

Only names, non-negative integer literals, unary minus and the operators + - * // are
allowed, and // only by a positive integer literal or a bare hyperparameter name (the spec
checker requires that hyperparameter's `min` to be at least 1, so no size divides by zero
whatever the values); anything else (calls, attributes, strings, `**`) is refused. Nothing reaches
`eval`.
"""

from __future__ import annotations

import ast
import copy

_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
}


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
    for node in ast.walk(tree.body):
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
        raise ValueError(f"{ast.unparse(node)!r} is not allowed (only names, integers, + - * //)")
    return tree.body


def names_in(expr: ast.expr) -> list[str]:
    """Names used by a parsed shape expression, in order of appearance."""
    return [n.id for n in ast.walk(expr) if isinstance(n, ast.Name)]


def divisors(expr: ast.expr) -> list[str]:
    """Hyperparameter names a parsed expression divides by (`d_in // oft_block_size` -> [oft_block_size])."""
    return [
        n.right.id
        for n in ast.walk(expr)
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.FloorDiv) and isinstance(n.right, ast.Name)
    ]


def eval_shape_expr(expr: ast.expr, env: dict[str, int]) -> int:
    """Evaluate a parsed expression with integer bindings.

    Raises KeyError naming an unknown name, ValueError for a division by zero.
    """
    if isinstance(expr, ast.Constant):
        return expr.value
    if isinstance(expr, ast.Name):
        if expr.id not in env:
            raise KeyError(expr.id)
        return int(env[expr.id])
    if isinstance(expr, ast.UnaryOp):
        return -eval_shape_expr(expr.operand, env)
    if isinstance(expr, ast.BinOp):
        try:
            return _OPS[type(expr.op)](eval_shape_expr(expr.left, env), eval_shape_expr(expr.right, env))
        except ZeroDivisionError:
            raise ValueError(f"division by zero in {ast.unparse(expr)!r}") from None
    raise ValueError(f"{ast.unparse(expr)!r} is not allowed")


def to_python(expr: ast.expr, prefix: str, dims: tuple[str, ...] = ("d_in", "d_out")) -> str:
    """Render an expression as Python source; hyperparameter names become `<prefix>.<name>`.

    `r - block` -> `cfg.r - cfg.block`; `d_in` stays `d_in`. Input must come from
    `parse_shape_expr`, so the output holds only names, integers and + - * //.
    """

    class _Rename(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:
            return node if node.id in dims else ast.Attribute(ast.Name(prefix, ast.Load()), node.id, ast.Load())

    return ast.unparse(_Rename().visit(copy.deepcopy(expr)))
