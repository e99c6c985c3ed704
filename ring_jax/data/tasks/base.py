"""The task interface: deterministic prompt records and verifiable rewards (RLVR, PAPER §5).

A task is a frozen, validated dataclass (its fields are its configuration, including a difficulty
knob) with two methods:

* ``sample(index, seed) -> PromptRecord`` — a pure function of ``(task config, index, seed)``.
* ``score(record, response_text) -> RewardResult`` — reward in [0, 1] plus details
  (``format_ok``, ``answer_parsed``, ``correct``, ...). It never raises, whatever the text: a
  verifier bug becomes reward 0 with ``details["error"]``, so one bad response cannot take down
  the reward worker pool.

Response convention (see `ring_jax.data.tokenizer`): ``reasoning</think>answer`` — the answer is
the text after the last ``</think>``; inside it a ``\\boxed{...}`` or ``Answer: ...`` is preferred,
otherwise the last non-empty line.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import re
import zlib
from typing import Any, Mapping

import numpy as np

from ring_jax.config import check_float, check_int

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One prompt draw. ``metadata`` is JSON-able and holds whatever ``score`` needs."""
    task: str
    index: int
    seed: int
    prompt: str
    answer: str
    thoughts: str | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def solution_text(self, thinking: bool = True) -> str:
        """The worked response for SFT, matching ``apply_chat_template(..., thinking)``."""
        if not thinking:
            return self.answer
        return f"{self.thoughts or ''}{THINK_CLOSE}{self.answer}"

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "index": self.index, "seed": self.seed,
                "prompt": self.prompt, "answer": self.answer, "thoughts": self.thoughts,
                "metadata_json": json.dumps(dict(self.metadata), sort_keys=True)}

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | PromptRecord) -> PromptRecord:
        """Accepts a record, its ``to_dict()``, or a pipeline output dict (same keys)."""
        if isinstance(m, PromptRecord):
            return m
        metadata = m.get("metadata")
        if metadata is None:
            metadata = json.loads(m.get("metadata_json") or "{}")
        prompt = m.get("prompt", m.get("prompt_text", ""))
        return cls(task=str(m["task"]), index=int(m.get("index", -1)),
                   seed=int(m.get("seed", -1)), prompt=str(prompt), answer=str(m["answer"]),
                   thoughts=m.get("thoughts"), metadata=metadata)


@dataclasses.dataclass(frozen=True)
class RewardResult:
    reward: float
    details: dict[str, Any]


def split_thinking(response: str) -> tuple[str, str, bool]:
    """``(thoughts, answer_region, think_closed)`` for ``reasoning</think>answer`` responses."""
    if THINK_CLOSE in response:
        thoughts, _, answer = response.rpartition(THINK_CLOSE)
        return thoughts.removeprefix(THINK_OPEN), answer, True
    return "", response, False


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}``, with nested braces matched."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: not a parseable answer


_ANSWER_RE = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*(.+)", re.IGNORECASE)


def extract_answer(answer_region: str) -> str | None:
    """The final answer string in a response's answer region, or None if there is none.

    Order: last ``\\boxed{}``; else text after the last "answer is/answer:"; else the last
    non-empty line. Surrounding whitespace, ``$`` and a trailing period are stripped.
    """
    boxed = last_boxed(answer_region)
    if boxed is not None:
        candidate = boxed
    else:
        matches = _ANSWER_RE.findall(answer_region)
        if matches:
            candidate = matches[-1]
        else:
            lines = [ln for ln in answer_region.splitlines() if ln.strip()]
            candidate = lines[-1] if lines else ""
    candidate = candidate.strip().strip("$").strip()
    candidate = candidate.removesuffix(".").strip()
    return candidate or None


def parse_int(text: str | None) -> int | None:
    """An integer written with optional sign, spaces or thousands commas; None otherwise."""
    if text is None:
        return None
    cleaned = text.replace(",", "").replace(" ", "")
    if not re.fullmatch(r"[+-]?\d{1,4000}", cleaned):
        return None
    return int(cleaned)


def task_rng(name: str, index: int, seed: int) -> np.random.Generator:
    """Independent stream per (task, index, seed): sample(i) never depends on sample(j)."""
    return np.random.default_rng([zlib.crc32(name.encode()), seed & 0xFFFFFFFF, index])


def draw_size(rng: np.random.Generator, lo: int, hi: int, tail: float) -> int:
    """A difficulty in [lo, hi] with P(size) ∝ (size - lo + 1) ** -tail.

    ``tail=0`` is uniform; larger ``tail`` makes most draws easy and a few hard, which gives
    the long-tailed response lengths that C3PO++'s token budget is designed for (PAPER §3.2).
    """
    sizes = np.arange(lo, hi + 1)
    weights = (sizes - lo + 1.0) ** -tail
    return int(rng.choice(sizes, p=weights / weights.sum()))


@dataclasses.dataclass(frozen=True)
class Task(abc.ABC):
    """Base for built-in tasks. Subclasses add config fields and implement ``_sample``/``_score``.

    ``min_size``/``max_size``/``size_tail``: the difficulty knob (see `draw_size`); what "size"
    means is task-specific (digits, chain length, list length, ...).
    """
    min_size: int = 2
    max_size: int = 2
    size_tail: float = 0.0

    name = "task"

    def __post_init__(self):
        check_int("min_size", self.min_size, min_value=1)
        check_int("max_size", self.max_size, min_value=self.min_size)
        check_float("size_tail", self.size_tail, min_value=0.0)

    def sample(self, index: int, seed: int) -> PromptRecord:
        rng = task_rng(self.name, index, seed)
        size = draw_size(rng, self.min_size, self.max_size, self.size_tail)
        prompt, answer, thoughts, metadata = self._sample(rng, size)
        return PromptRecord(task=self.name, index=index, seed=seed, prompt=prompt,
                            answer=answer, thoughts=thoughts, metadata=metadata)

    def held_out(self) -> Task:
        """The task to evaluate on, with problems training does not see. A generated task is
        its own held-out set: evaluation draws it with another seed (`EvalConfig.seed_offset`);
        file tasks return their held-out rows."""
        return self

    def score(self, record: PromptRecord | Mapping[str, Any], response_text: str) -> RewardResult:
        try:
            record = PromptRecord.from_mapping(record)
            thoughts, region, closed = split_thinking(str(response_text))
            details = {"think_closed": closed, "format_ok": False, "answer_parsed": False,
                       "correct": False}
            details.update(self._score(record, region))
            details["format_ok"] = bool(details["answer_parsed"]) and THINK_OPEN not in region
            reward = float(min(max(details.pop("reward", float(details["correct"])), 0.0), 1.0))
            return RewardResult(reward, details)
        except Exception as e:  # noqa: BLE001 — a verifier must never take down the worker
            return RewardResult(0.0, {"format_ok": False, "answer_parsed": False,
                                      "correct": False, "error": repr(e)[:500]})

    @abc.abstractmethod
    def _sample(self, rng: np.random.Generator, size: int) -> tuple[str, str, str | None, dict]:
        """-> (prompt, reference answer, worked thoughts or None, JSON-able metadata)."""

    @abc.abstractmethod
    def _score(self, record: PromptRecord, answer_region: str) -> dict[str, Any]:
        """-> details with at least ``answer_parsed`` and ``correct`` (optionally ``reward``)."""
