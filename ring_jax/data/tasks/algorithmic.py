"""Algorithmic string/list tasks: reversal, sorting, counting. ``size`` = input length."""
from __future__ import annotations

import dataclasses
import re
import string

from ring_jax.config import check_int
from ring_jax.data.tasks.base import Task, extract_answer, parse_int


# "1, 2, 3", "[1 2 3]"; at most 100 digits per number (int() refuses > 4300 digits).
_INT_LIST_RE = re.compile(r"[\[(]?\s*-?\d{1,100}(\s*[, ]\s*-?\d{1,100})*\s*[\])]?")


def _letters(rng, n: int, alphabet: int) -> str:
    return "".join(string.ascii_lowercase[int(i)] for i in rng.integers(0, alphabet, n))


@dataclasses.dataclass(frozen=True)
class ReverseTask(Task):
    """Reverse a lowercase string. No worked thoughts: the answer is the whole response."""
    min_size: int = 3
    max_size: int = 5
    alphabet: int = 26

    name = "reverse"

    def __post_init__(self):
        super().__post_init__()
        check_int("alphabet", self.alphabet, min_value=2, max_value=26)

    def _sample(self, rng, size):
        text = _letters(rng, size, self.alphabet)
        return f"reverse {text}", text[::-1], "", {}

    def _score(self, record, answer_region):
        answer = extract_answer(answer_region)
        answer = answer.replace(" ", "") if answer is not None else None
        return {"answer_parsed": bool(answer), "correct": answer == record.answer}


@dataclasses.dataclass(frozen=True)
class SortTask(Task):
    """Sort integers ascending; the answer is a comma-separated list. Thoughts pick the minimum
    one element at a time (one step per element: length grows with ``size``)."""
    min_size: int = 3
    max_size: int = 8
    max_value: int = 99

    name = "sort"

    def __post_init__(self):
        super().__post_init__()
        check_int("max_value", self.max_value, min_value=1)

    def _sample(self, rng, size):
        values = [int(v) for v in rng.integers(0, self.max_value + 1, size)]
        ordered = sorted(values)
        thoughts = ",".join(f"min{i + 1}={v}" for i, v in enumerate(ordered))
        return (f"sort ascending: {', '.join(map(str, values))}", ", ".join(map(str, ordered)),
                thoughts, {})

    def _score(self, record, answer_region):
        answer = extract_answer(answer_region)
        if answer is None or not _INT_LIST_RE.fullmatch(answer):
            return {"answer_parsed": False, "correct": False}
        parsed = [int(x) for x in re.findall(r"-?\d+", answer)]
        expected = [int(x) for x in record.answer.split(",")]
        return {"answer_parsed": True, "correct": parsed == expected}


@dataclasses.dataclass(frozen=True)
class CountTask(Task):
    """How many times does a letter occur in a string. Thoughts keep a running tally."""
    min_size: int = 4
    max_size: int = 12
    alphabet: int = 4

    name = "count"

    def __post_init__(self):
        super().__post_init__()
        check_int("alphabet", self.alphabet, min_value=2, max_value=26)

    def _sample(self, rng, size):
        text = _letters(rng, size, self.alphabet)
        letter = string.ascii_lowercase[int(rng.integers(self.alphabet))]
        tally, steps = 0, []
        for ch in text:
            tally += ch == letter
            steps.append(f"{ch}{tally}")
        return (f"count '{letter}' in {text}", str(tally), " ".join(steps),
                {"letter": letter})

    def _score(self, record, answer_region):
        parsed = parse_int(extract_answer(answer_region))
        return {"answer_parsed": parsed is not None,
                "correct": parsed is not None and parsed == int(record.answer)}
