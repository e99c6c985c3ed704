"""Countdown: reach a target from given numbers with + - * /; any valid expression scores.

The scorer is a verifier, not a string match: it parses the expression with ``ast`` (only
integer literals and the four binary operators are allowed), checks each given number is used at
most once, and evaluates it exactly with fractions.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
from fractions import Fraction

from ring_jax.config import check_int
from ring_jax.data.tasks.base import Task, extract_answer

_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
        ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}
_MAX_EXPR_CHARS = 300


def evaluate_expression(expr: str) -> tuple[Fraction, list[int]]:
    """Exact value and the integer literals of an expression; ValueError if not allowed."""
    if len(expr) > _MAX_EXPR_CHARS:
        raise ValueError("expression too long")
    tree = ast.parse(expr.replace("×", "*").replace("÷", "/"), mode="eval")
    literals: list[int] = []

    def walk(node) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        raise ValueError(f"not allowed: {type(node).__name__}")

    return walk(tree.body), literals


@dataclasses.dataclass(frozen=True)
class CountdownTask(Task):
    """``size`` numbers in [1, max_number]; the target is built from a random expression over
    all of them, so a solution always exists. Worked thoughts list the combination steps."""
    min_size: int = 3
    max_size: int = 4
    max_number: int = 25

    name = "countdown"

    def __post_init__(self):
        super().__post_init__()
        check_int("min_size", self.min_size, min_value=2)
        check_int("max_number", self.max_number, min_value=2, max_value=1000)

    def _sample(self, rng, size):
        while True:
            numbers = [int(x) for x in rng.integers(1, self.max_number + 1, size)]
            items = [(Fraction(n), str(n)) for n in numbers]
            steps = []
            while len(items) > 1:
                i, j = rng.choice(len(items), 2, replace=False)
                (a, ea), (b, eb) = items[i], items[j]
                op = "+-*/"[int(rng.integers(4))]
                if op == "/" and (b == 0 or a % b != 0):
                    op = "+"
                if op == "-" and a < b:
                    (a, ea), (b, eb) = (b, eb), (a, ea)
                value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else a}[op]
                steps.append(f"{a}{op}{b}={value}")
                items = [it for k, it in enumerate(items) if k not in (i, j)]
                items.append((value, f"({ea}{op}{eb})"))
            target, expr = items[0]
            if target > 0 and target.denominator == 1:
                break
        expr = expr[1:-1] if expr.startswith("(") else expr
        prompt = (f"Using the numbers {', '.join(map(str, numbers))}, make {int(target)}. "
                  "Use each number at most once with + - * / and parentheses.")
        return prompt, expr, ",".join(steps), {"numbers": numbers, "target": int(target)}

    def _score(self, record, answer_region):
        answer = extract_answer(answer_region)
        if answer is None:
            return {"answer_parsed": False, "correct": False}
        expr = answer.split("=")[0]  # "3*4+2 = 14" states the target after the expression
        try:
            value, literals = evaluate_expression(expr)
        except (ValueError, SyntaxError, ZeroDivisionError, RecursionError, MemoryError):
            return {"answer_parsed": False, "correct": False}
        available = collections.Counter(record.metadata["numbers"])
        uses_allowed = not (collections.Counter(literals) - available)
        return {"answer_parsed": True, "uses_allowed_numbers": uses_allowed,
                "correct": uses_allowed and value == record.metadata["target"]}
