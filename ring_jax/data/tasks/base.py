"""The task interface: deterministic prompt records and verifiable rewards (RLVR, PAPER §5).

A task is a frozen, validated dataclass (its fields are its configuration, including a difficulty
knob) with two methods:

* ``sample(index, seed) -> PromptRecord`` — a pure function of ``(task config, index, seed)``.
* ``score(record, response_text) -> RewardResult`` — reward in [0, 1] plus details
  (``format_ok``, ``answer_parsed``, ``correct``, ...). It never raises, whatever the text: a
  verifier bug becomes reward 0 with ``details["error"]``, so one bad response cannot take down
  the reward worker pool.

Evaluation is disjoint from training by construction (`in_eval_split`): a problem belongs to the
held-out split when a hash of its prompt falls in the first ``eval_fraction`` of the hash range.
The rule depends on the problem alone (not on the seed, the index or the order of draws), so a
``split="train"`` task (the default: SFT and RL) can never produce a problem that its
``held_out()`` task (``split="eval"``) produces, under any seed. A generated task draws again
from the same stream until the problem falls in its split, so ``sample`` stays a pure function
of ``(config, index, seed)``; file tasks split their rows the same way (`file_task.FileTask`).

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

from ring_jax.config import ConfigError, check_float, check_int, check_one_of

SPLITS = ("train", "eval", "all")
MAX_SPLIT_DRAWS = 1000  # draws before a split is declared empty for this task's config
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


def in_eval_split(task_name: str, prompt: str, eval_fraction: float) -> bool:
    """Whether the problem ``prompt`` of task ``task_name`` is held out for evaluation: its
    CRC-32 (salted with the task's name) is below ``eval_fraction`` of the 32-bit range. A pure
    function of the problem, so duplicates land on the same side, whatever produced them."""
    return zlib.crc32(f"{task_name}\n{prompt}".encode()) < eval_fraction * 2**32


def draw_size(rng: np.random.Generator, lo: int, hi: int, tail: float) -> int:
    """A difficulty in [lo, hi] with P(size) ∝ (size - lo + 1) ** -tail.

    ``tail=0`` is uniform; larger ``tail`` makes most draws easy and a few hard, which gives
    the long-tailed response lengths that C3PO++'s token budget is designed for (PAPER §3.2).
    """
    if lo == hi:  # one size: no draw (the cheap path of the most common config)
        return lo
    cdf = np.cumsum((np.arange(1, hi - lo + 2, dtype=np.float64)) ** -tail)
    return lo + int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))


@dataclasses.dataclass(frozen=True)
class Task(abc.ABC):
    """Base for built-in tasks. Subclasses add config fields and implement ``_sample``/``_score``.

    ``min_size``/``max_size``/``size_tail``: the difficulty knob (see `draw_size`); what "size"
    means is task-specific (digits, chain length, list length, ...).
    ``eval_fraction``: share of the problem space held out for evaluation (`in_eval_split`);
    ``split``: which problems this task produces: "train" (the rest; SFT and RL), "eval" (the
    held-out ones; `held_out` gives it) or "all" (no split).
    """
    min_size: int = 2
    max_size: int = 2
    size_tail: float = 0.0
    eval_fraction: float = 0.1
    split: str = "train"

    name = "task"

    def __post_init__(self):
        check_int("min_size", self.min_size, min_value=1)
        check_int("max_size", self.max_size, min_value=self.min_size)
        check_float("size_tail", self.size_tail, min_value=0.0)
        check_float("eval_fraction", self.eval_fraction, min_value=0.0, max_value=1.0)
        check_one_of("split", self.split, SPLITS)

    def in_split(self, prompt: str) -> bool:
        """Whether this task's split contains the problem ``prompt``."""
        if self.split == "all" or self.eval_fraction == 0:
            return self.split != "eval"
        return in_eval_split(self.name, prompt, self.eval_fraction) == (self.split == "eval")

    def sample(self, index: int, seed: int) -> PromptRecord:
        rng = task_rng(self.name, index, seed)
        for _ in range(MAX_SPLIT_DRAWS):  # rejection: ~1/(share of the split) draws on average
            size = draw_size(rng, self.min_size, self.max_size, self.size_tail)
            prompt, answer, thoughts, metadata = self._sample(rng, size)
            if self.in_split(prompt):
                return PromptRecord(task=self.name, index=index, seed=seed, prompt=prompt,
                                    answer=answer, thoughts=thoughts, metadata=metadata)
        raise ConfigError(
            f"task.kwargs.eval_fraction={self.eval_fraction!r} is invalid: {self.name} drew no "
            f"problem of split {self.split!r} in {MAX_SPLIT_DRAWS} draws (index {index}, seed "
            f"{seed}); its problem space is too small for this split")

    def held_out(self) -> Task:
        """The task to evaluate on: the held-out split (``split="eval"``), disjoint from this
        task's problems by construction. With ``split="all"`` or ``eval_fraction=0`` there is
        none, and evaluation uses the training problems themselves."""
        if self.split == "all" or self.eval_fraction == 0:
            return self
        return dataclasses.replace(self, split="eval")

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
