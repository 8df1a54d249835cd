"""A restricted evaluator for the small expressions a search space may hold.

Only arithmetic (``+ - * / // % **``), comparisons (``== != < <= > >= in``), boolean
operators (``and or not``), conditional expressions (``a if c else b``), names, and
literal numbers, strings, booleans, None and tuples/lists of literals are allowed.
Everything else (calls, attributes, subscripts, comprehensions, lambdas) is rejected
when the expression is parsed. Python's ``eval`` is never used: the tree is walked here.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from typing import Any

from qkvsearch.models.errors import QkvError

MAX_LENGTH = 400
MAX_EXPONENT = 64
MAX_MAGNITUDE = 10**30


class ExpressionError(QkvError):
    """An expression that is not allowed, or that cannot be evaluated."""


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_ALLOWED = (
    "arithmetic (+ - * / // % **), comparisons (== != < <= > >= in, not in), "
    "and/or/not, 'a if c else b', names and literals"
)


class Expression:
    """A parsed, checked expression. ``names`` holds every name it reads."""

    def __init__(self, source: str) -> None:
        if not isinstance(source, str):
            raise ExpressionError(f"an expression must be a string, got {source!r}")
        if len(source) > MAX_LENGTH:
            raise ExpressionError(f"expression longer than {MAX_LENGTH} characters: {source[:40]!r}...")
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
            reason = error.msg if isinstance(error, SyntaxError) else type(error).__name__
            raise ExpressionError(f"cannot parse expression {source!r}: {reason}") from None
        self.source = source
        self.names: set[str] = set()
        self._check(tree.body)
        self._tree = tree.body

    def _check(self, node: ast.AST) -> None:
        """Rejects any node outside the allowed subset; collects names."""
        if isinstance(node, ast.Name):
            self.names.add(node.id)
            return
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float, str, bool, type(None))):
                raise ExpressionError(f"literal {node.value!r} is not allowed in {self.source!r}")
            return
        allowed = (
            (isinstance(node, ast.BinOp) and type(node.op) in _BINARY)
            or (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)))
            or isinstance(node, (ast.BoolOp, ast.IfExp, ast.Tuple, ast.List))
            or (isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops))
        )
        if not allowed or isinstance(node, (ast.Tuple, ast.List)) and not isinstance(getattr(node, "ctx", ast.Load()), ast.Load):
            raise ExpressionError(
                f"{type(node).__name__} is not allowed in expression {self.source!r}; allowed: {_ALLOWED}"
            )
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.expr_context, ast.operator, ast.unaryop, ast.boolop, ast.cmpop)):
                continue
            self._check(child)

    def evaluate(self, values: Mapping[str, Any]) -> Any:
        """Evaluates the expression with ``values`` for its names.

        Raises:
            ExpressionError: a name without a value, a type error, a division by zero,
                or a number past the evaluator's limits.
        """
        try:
            return self._eval(self._tree, values)
        except ExpressionError:
            raise
        except (TypeError, ZeroDivisionError, OverflowError, ValueError) as error:
            raise ExpressionError(f"cannot evaluate {self.source!r}: {error}") from None

    def _eval(self, node: ast.AST, values: Mapping[str, Any]) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in values:
                raise ExpressionError(f"{node.id!r} has no value in {self.source!r}")
            return values[node.id]
        if isinstance(node, (ast.Tuple, ast.List)):
            return tuple(self._eval(e, values) for e in node.elts)
        if isinstance(node, ast.UnaryOp):
            operand = self._eval(node.operand, values)
            if isinstance(node.op, ast.Not):
                return not operand
            return _number(operand, self.source) * (-1 if isinstance(node.op, ast.USub) else 1)
        if isinstance(node, ast.BoolOp):
            result = self._eval(node.values[0], values)
            for value in node.values[1:]:
                if isinstance(node.op, ast.And) != bool(result):
                    return result
                result = self._eval(value, values)
            return result
        if isinstance(node, ast.IfExp):
            branch = node.body if self._eval(node.test, values) else node.orelse
            return self._eval(branch, values)
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, values)
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                right = self._eval(right_node, values)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if not isinstance(node, ast.BinOp):  # _check lets nothing else through
            raise ExpressionError(f"{type(node).__name__} is not allowed in {self.source!r}")
        left = _number(self._eval(node.left, values), self.source)
        right = _number(self._eval(node.right, values), self.source)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ExpressionError(f"exponent {right} is past the limit ({MAX_EXPONENT}) in {self.source!r}")
        result = _BINARY[type(node.op)](left, right)
        if isinstance(result, complex) or abs(result) > MAX_MAGNITUDE:
            raise ExpressionError(f"result {result!r} is out of range in {self.source!r}")
        return result


def _number(value: Any, source: str) -> int | float:
    """Arithmetic works on numbers only (no string or sequence repetition)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ExpressionError(f"arithmetic needs numbers, got {value!r} in {source!r}")
    return value
