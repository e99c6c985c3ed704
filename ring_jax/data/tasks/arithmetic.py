"""Arithmetic tasks with step-by-step worked solutions: addition, multiplication, chains.

``AdditionTask`` with 2-3 digits and ``show_steps=False`` is the quickstart task: prompts like
``47+85=`` and responses ``</think>132`` are a handful of byte tokens, learnable on CPU by a ~1M
parameter MoE after a short SFT warm-start.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ring_jax.config import check_int
from ring_jax.data.tasks.base import PromptRecord, Task, extract_answer, parse_int


def _score_int(record: PromptRecord, answer_region: str) -> dict[str, Any]:
    parsed = parse_int(extract_answer(answer_region))
    return {"answer_parsed": parsed is not None,
            "correct": parsed is not None and parsed == int(record.answer)}


def _random_int(rng: np.random.Generator, digits: int) -> int:
    """Exactly ``digits`` digits (leading digit non-zero unless digits == 1)."""
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(lo, 10 ** digits))


def column_addition_steps(operands: list[int]) -> str:
    """Right-to-left column sums with carries, e.g. [47, 85] -> '7+5=12,4+8+1=13'."""
    width = max(len(str(x)) for x in operands)
    padded = [str(x).zfill(width) for x in operands]
    steps, carry = [], 0
    for col in range(width - 1, -1, -1):
        terms = [p[col] for p in padded] + ([str(carry)] if carry else [])
        total = sum(int(t) for t in terms)
        steps.append(f"{'+'.join(terms)}={total}")
        carry = total // 10
    return ",".join(steps)


@dataclasses.dataclass(frozen=True)
class AdditionTask(Task):
    """``a+b(+c...)=`` with ``size`` = digits per operand; steps are column sums with carries."""
    num_operands: int = 2
    show_steps: bool = False

    name = "addition"

    def __post_init__(self):
        super().__post_init__()
        check_int("num_operands", self.num_operands, min_value=2, max_value=16)

    def _sample(self, rng, size):
        operands = [_random_int(rng, size) for _ in range(self.num_operands)]
        thoughts = column_addition_steps(operands) if self.show_steps else ""
        return "+".join(map(str, operands)) + "=", str(sum(operands)), thoughts, {}

    def _score(self, record, answer_region):
        return _score_int(record, answer_region)


@dataclasses.dataclass(frozen=True)
class MultiplicationTask(Task):
    """``a*b=`` with ``size`` digits each; steps are the partial products and their sum."""
    show_steps: bool = True

    name = "multiplication"

    def _sample(self, rng, size):
        a, b = _random_int(rng, size), _random_int(rng, size)
        thoughts = ""
        if self.show_steps:
            partials = [a * int(d) * 10 ** k for k, d in enumerate(reversed(str(b)))]
            steps = [f"{a}*{int(d) * 10 ** k}={p}"
                     for k, (d, p) in enumerate(zip(reversed(str(b)), partials))]
            steps.append("+".join(map(str, partials)) + f"={a * b}")
            thoughts = ",".join(steps)
        return f"{a}*{b}=", str(a * b), thoughts, {}

    def _score(self, record, answer_region):
        return _score_int(record, answer_region)


@dataclasses.dataclass(frozen=True)
class ArithmeticChainTask(Task):
    """A start value and ``size`` operations applied in order; the worked solution has one step
    per operation, so response length grows linearly with ``size`` (long-tailed with
    ``size_tail``)."""
    digits: int = 2
    min_size: int = 2
    max_size: int = 8

    name = "arithmetic_chain"

    def __post_init__(self):
        super().__post_init__()
        check_int("digits", self.digits, min_value=1, max_value=6)

    def _sample(self, rng, size):
        value = _random_int(rng, self.digits)
        words, steps = [f"Start at {value}"], []
        for _ in range(size):
            op = ("+", "-", "*")[int(rng.integers(3))]
            operand = int(rng.integers(2, 10)) if op == "*" else _random_int(rng, self.digits)
            new = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
            words.append({"+": "add", "-": "subtract", "*": "multiply by"}[op] + f" {operand}")
            steps.append(f"{value}{op}{operand}={new}")
            value = new
        return ", ".join(words) + ".", str(value), ",".join(steps), {}

    def _score(self, record, answer_region):
        return _score_int(record, answer_region)
