"""Math problems from a local JSONL/parquet file (question, answer), scored with math-verify.

math-verify normally bounds its sympy work with ``signal.alarm``, which only works on the main
thread; the reward pool calls ``score`` from worker threads, so it is called with its timeouts
off (``parsing_timeout=None, timeout_seconds=None``). Without a timeout, a response like
``\\boxed{9^{9^{9}}}`` would make sympy compute a gigantic integer while holding the GIL and
freeze the whole process; `looks_expensive` rejects such answers first (power towers, huge
exponents, factorials/binomials of large numbers, very long answers). This guard is a
heuristic (extended by fuzzing until no hang was found); for a hard guarantee also set
``RewardConfig(score_timeout_s=...)``, which scores in killable worker processes.
"""
from __future__ import annotations

import dataclasses
import re

from ring_jax.config import check_int
from ring_jax.data.tasks.base import extract_answer, last_boxed
from ring_jax.data.tasks.file_task import FileTask, check_field

_MAX_ANSWER_CHARS = 300


def _group_after(text: str, start: int) -> str:
    """The exponent starting at ``start``: a {...}, (...) or [...] group, else a run of word
    chars."""
    if start < len(text) and text[start] in "{([":
        close = {"{": "}", "(": ")", "[": "]"}[text[start]]
        depth = 0
        for j in range(start, len(text)):
            depth += (text[j] == text[start]) - (text[j] == close)
            if depth == 0:
                return text[start:j + 1]
        return text[start:]
    m = re.match(r"[\w.]*", text[start:])
    return m.group(0)


def looks_expensive(text: str) -> bool:
    """True if sympy could spend unbounded time on this answer (see the module docstring).

    Rejects: long answers; power towers (``exp`` counts as a power) or exponents with > 5 digits
    or a factorial inside, and the same inside an n-th root's index; any factorial whose
    argument is not a plain integer of at most 2 digits, binomial whose arguments are not plain
    integers of at most 4 digits, any Gamma, or more than one of them (``(9!)!`` is as bad as
    ``362880!``)."""
    if len(text) > _MAX_ANSWER_CHARS:
        return True
    # exp(a) is e^(a) for this purpose: e^{exp(10!)} is a tower too.
    compact = re.sub(r"\s+", "", text).replace("\\exp", "e^").replace("exp(", "e^(")
    for m in re.finditer(r"\^|\*\*", compact):
        exponent = _group_after(compact, m.end())
        rest = compact[m.end() + len(exponent):]
        if (any(op in exponent for op in ("^", "**", "!", "binom", "Gamma"))
                or rest.startswith(("^", "**", "!"))
                or any(len(d) > 5 for d in re.findall(r"\d+", exponent))):
            return True
    for m in re.finditer(r"\\sqrt\[", compact):  # an n-th root is the power 1/n
        index = _group_after(compact, m.end() - 1)
        if (any(op in index for op in ("^", "**", "!", "binom", "Gamma", "sqrt"))
                or any(len(d) > 5 for d in re.findall(r"\d+", index))):
            return True
    combinatorial = re.findall(r"!|binom|choose|factorial|Gamma|Γ", compact)
    if not combinatorial:
        return False
    if len(combinatorial) > 1:
        return True
    if "!" in combinatorial:
        return not re.search(r"(?:^|[^\w.)}])(?:\d{1,2}|\(\d{1,2}\)|\{\d{1,2}\})!", compact)
    return not re.search(r"binom\{\d{1,4}\}\{\d{1,4}\}|binom\(\d{1,4},\d{1,4}\)", compact)


def _as_math(text: str) -> str:
    return text if "$" in text or "\\boxed" in text else f"${text}$"


@dataclasses.dataclass(frozen=True)
class MathFileTask(FileTask):
    """``question``/``answer`` (LaTeX or plain) rows, optional ``solution`` (worked thoughts)
    and ``level``. The worked answer is ``\\boxed{answer}``."""
    question_key: str = "question"
    answer_key: str = "answer"
    solution_key: str = "solution"
    instruction: str = " Put your final answer within \\boxed{}."
    max_response_chars: int = 4000
    guard: bool = True  # reject answers `looks_expensive` flags (keep on unless isolated)

    name = "math"
    default_file = "math_sample.jsonl"

    def __post_init__(self):
        super().__post_init__()
        check_int("max_response_chars", self.max_response_chars, min_value=1)

    def row_problem(self, row):
        return (check_field(row, self.question_key, (str,))
                or check_field(row, self.answer_key, (str, int, float))
                or check_field(row, self.solution_key, (str,), required=False))

    def _from_row(self, row):
        gold = str(row[self.answer_key])
        thoughts = row.get(self.solution_key)
        return (str(row[self.question_key]) + self.instruction, f"\\boxed{{{gold}}}",
                None if thoughts is None else str(thoughts), {"gold": gold})

    def _score(self, record, answer_region):
        from math_verify import parse, verify  # heavy import, only for math tasks

        region = answer_region[-self.max_response_chars:]
        boxed = last_boxed(region)
        if boxed is not None:
            candidate = f"\\boxed{{{boxed}}}"
        else:
            extracted = extract_answer(region)
            candidate = _as_math(extracted) if extracted else ""
        if not candidate or (self.guard and looks_expensive(candidate)):
            return {"answer_parsed": False, "correct": False,
                    "rejected": bool(candidate)}
        pred = parse(candidate, parsing_timeout=None)
        if not pred:
            return {"answer_parsed": False, "correct": False}
        gold = parse(_as_math(record.metadata["gold"]), parsing_timeout=None)
        return {"answer_parsed": True,
                "correct": bool(verify(gold, pred, timeout_seconds=None))}
