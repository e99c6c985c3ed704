"""Reward composition: task reward, optional format reward, overlong penalty (PAPER §5 RLVR).

``make_reward_fn(cfg, task, tokenizer)`` returns ``reward_fn(record, response_tokens,
finish_reason) -> (reward, info)``. It holds no mutable state, so the scheduler may call it from
a host thread pool concurrently (the math checker is called with its signal-based timeouts off).

    base    = registered reward function (``cfg.name``): "task" (the verifier) or "format"
    r       = (1 - format_weight) * base + format_weight * format_ok
    r       = 0                       if require_think_close and no </think> was written
    r       = truncated_reward        if finish_reason == "length" and truncated_reward is set
    r      -= overlong_penalty * clip((len - (max_response_tokens - overlong_buffer))
                                      / overlong_buffer, 0, 1)     (DAPO soft overlong penalty)

so ``r`` lies in [-overlong_penalty, 1].

``score_timeout_s`` runs the task's verifier in ``score_workers`` separate processes with a hard
deadline (`ring_jax.data.isolated`), for verifiers that cannot be interrupted in a thread; the
returned function then has a ``close()`` that stops them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ring_jax.config import check, check_float, check_int, check_one_of
from ring_jax.data.tasks.base import PromptRecord, RewardResult, Task

BaseRewardFn = Callable[[Task, PromptRecord, str], RewardResult]


def task_reward(task: Task, record: PromptRecord, response_text: str) -> RewardResult:
    """The task's own verifier (exact answer, math-verify, sandboxed tests, ...)."""
    return task.score(record, response_text)


def format_reward(task: Task, record: PromptRecord, response_text: str) -> RewardResult:
    """1 if an answer could be parsed in the right place, whatever its value (format warm-up)."""
    result = task.score(record, response_text)
    return RewardResult(float(result.details.get("format_ok", False)), result.details)


_REWARD_FNS: dict[str, BaseRewardFn] = {"task": task_reward, "format": format_reward}


def register_reward(name: str, fn: BaseRewardFn) -> None:
    check(name not in _REWARD_FNS, "name", name, "is already registered")
    _REWARD_FNS[name] = fn


def reward_names() -> list[str]:
    return sorted(_REWARD_FNS)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    name: str = "task"
    format_weight: float = 0.0
    require_think_close: bool = False
    truncated_reward: float | None = None
    max_response_tokens: int | None = None
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    score_timeout_s: float | None = None
    score_workers: int = 2

    def __post_init__(self):
        check_one_of("name", self.name, reward_names())
        check_float("format_weight", self.format_weight, min_value=0.0, max_value=1.0)
        if self.truncated_reward is not None:
            check_float("truncated_reward", self.truncated_reward, min_value=-1.0,
                        max_value=1.0)
        check_int("overlong_buffer", self.overlong_buffer, min_value=0)
        check_float("overlong_penalty", self.overlong_penalty, min_value=0.0)
        if self.max_response_tokens is not None:
            check_int("max_response_tokens", self.max_response_tokens, min_value=1)
            check_int("overlong_buffer", self.overlong_buffer, min_value=0,
                      max_value=self.max_response_tokens)
        else:
            check(self.overlong_buffer == 0, "overlong_buffer", self.overlong_buffer,
                  "must be 0 unless max_response_tokens is set")
        if self.score_timeout_s is not None:
            check_float("score_timeout_s", self.score_timeout_s, min_value=0.0,
                        min_exclusive=True)
        check_int("score_workers", self.score_workers, min_value=1)


def overlong_penalty(cfg: RewardConfig, num_tokens: int) -> float:
    """DAPO's soft overlong punishment: 0 until ``max - buffer`` tokens, then linear to the
    full penalty at ``max``. With buffer 0 it is a step at ``max``."""
    if cfg.max_response_tokens is None:
        return 0.0
    if cfg.overlong_buffer == 0:  # a response that used the whole budget was truncated
        return cfg.overlong_penalty if num_tokens >= cfg.max_response_tokens else 0.0
    start = cfg.max_response_tokens - cfg.overlong_buffer
    if num_tokens <= start:
        return 0.0
    return cfg.overlong_penalty * min((num_tokens - start) / cfg.overlong_buffer, 1.0)


def decode_response(tokenizer, response_tokens: Sequence[int] | np.ndarray) -> tuple[str, int]:
    """(text before the first EOS, response length in tokens including that EOS).

    Pad ids are dropped from both, so a caller may pass fixed-width padded rows."""
    ids = [int(t) for t in np.asarray(response_tokens).reshape(-1)]
    if tokenizer.pad_id != tokenizer.eos_id:  # pad == EOS (common for HF): EOS cuts instead
        ids = [i for i in ids if i != tokenizer.pad_id]
    if tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id) + 1]
        return tokenizer.decode(ids[:-1]), len(ids)
    return tokenizer.decode(ids), len(ids)


class _IsolatedTask:
    """``task`` with ``score`` run by an `IsolatedScorer`; other attributes pass through."""

    def __init__(self, task: Task, scorer):
        self._task, self._scorer = task, scorer

    def score(self, record, response_text: str) -> RewardResult:
        return self._scorer.score(self._task, record, response_text)

    def __getattr__(self, name: str):
        return getattr(self._task, name)


def make_reward_fn(cfg: RewardConfig, task: Task, tokenizer
                   ) -> Callable[[Any, Sequence[int], str | None], tuple[float, dict]]:
    base_fn = _REWARD_FNS[cfg.name]
    scorer = None
    if cfg.score_timeout_s is not None:
        from ring_jax.data.isolated import IsolatedScorer
        scorer = IsolatedScorer(cfg.score_workers, cfg.score_timeout_s)
        task = _IsolatedTask(task, scorer)

    def reward_fn(record: PromptRecord | Mapping[str, Any], response_tokens: Sequence[int],
                  finish_reason: str | None) -> tuple[float, dict]:
        text, num_tokens = decode_response(tokenizer, response_tokens)
        result = base_fn(task, PromptRecord.from_mapping(record), text)
        format_ok = float(result.details.get("format_ok", False))
        reward = (1.0 - cfg.format_weight) * result.reward + cfg.format_weight * format_ok
        think_closed = bool(result.details.get("think_closed", False))
        if cfg.require_think_close and not think_closed:
            reward = 0.0
        if finish_reason == "length" and cfg.truncated_reward is not None:
            reward = cfg.truncated_reward
        penalty = overlong_penalty(cfg, num_tokens)
        reward -= penalty
        info = dict(result.details)
        info.update({"reward/base": result.reward, "reward/format": format_ok,
                     "reward/length_penalty": penalty, "reward/total": reward,
                     "response_tokens": num_tokens, "finish_reason": finish_reason})
        return float(reward), info

    reward_fn.close = scorer.close if scorer is not None else (lambda: None)
    return reward_fn
