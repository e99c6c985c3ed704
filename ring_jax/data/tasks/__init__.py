"""Task registry: ``tasks.get(name, **config) -> Task``.

Built-ins: addition (the quickstart task), multiplication, arithmetic_chain, countdown, reverse,
sort, count, math (local JSONL/parquet, math-verify), code (local JSONL, sandboxed tests),
gym/<reasoning-gym dataset name> (optional ``[gym]`` extra). Heavy ones import lazily.
"""
from __future__ import annotations

import importlib
from typing import Callable

from ring_jax.config import fail
from ring_jax.data.tasks.base import (PromptRecord, RewardResult, Task, extract_answer,
                                      split_thinking)

_REGISTRY: dict[str, Callable[..., Task] | str] = {
    "addition": "ring_jax.data.tasks.arithmetic:AdditionTask",
    "multiplication": "ring_jax.data.tasks.arithmetic:MultiplicationTask",
    "arithmetic_chain": "ring_jax.data.tasks.arithmetic:ArithmeticChainTask",
    "countdown": "ring_jax.data.tasks.countdown:CountdownTask",
    "reverse": "ring_jax.data.tasks.algorithmic:ReverseTask",
    "sort": "ring_jax.data.tasks.algorithmic:SortTask",
    "count": "ring_jax.data.tasks.algorithmic:CountTask",
    "math": "ring_jax.data.tasks.math_file:MathFileTask",
    "code": "ring_jax.data.tasks.code_file:CodeFileTask",
}
_GYM_PREFIX = "gym/"


def register(name: str, factory: Callable[..., Task]) -> None:
    """Adds a task factory (usually the Task subclass itself) under ``name``."""
    if name in _REGISTRY or name.startswith(_GYM_PREFIX):
        fail("name", name, "is already registered or reserved")
    _REGISTRY[name] = factory


def _resolve(name: str) -> Callable[..., Task]:
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module, attr = factory.split(":")
        factory = getattr(importlib.import_module(module), attr)
        _REGISTRY[name] = factory
    return factory


def names() -> list[str]:
    """Registered task names (reasoning-gym tasks are additionally ``gym/<dataset>``)."""
    return sorted(_REGISTRY)


def is_known(name: str) -> bool:
    """Whether ``get(name)`` can resolve the name (a ``gym/`` name is checked by ``get``)."""
    return name in _REGISTRY or (name.startswith(_GYM_PREFIX) and len(name) > len(_GYM_PREFIX))


def get(name: str, **config) -> Task:
    """``get("addition", min_size=2, max_size=3)``; ``get("gym/chain_sum", size=1000)``."""
    if name.startswith(_GYM_PREFIX):
        from ring_jax.data.tasks.gym import GymTask
        return GymTask(dataset=name[len(_GYM_PREFIX):], **config)
    if name not in _REGISTRY:
        fail("task", name, f"must be one of {names()} or gym/<reasoning-gym dataset>")
    return _resolve(name)(**config)


__all__ = ["PromptRecord", "RewardResult", "Task", "extract_answer", "get", "is_known", "names",
           "register", "split_thinking"]
