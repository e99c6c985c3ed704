"""Adapter for `reasoning-gym` (optional ``[gym]`` extra): any registered generator by name,
scored by that generator's own ``score_answer`` (partial credit where it gives one).

``tasks.get("gym/chain_sum", size=1000, config={"min_terms": 2, "max_terms": 6})``. The
difficulty knob is the generator's own config (term counts, digits, grid sizes, ...). Items are
regenerated from ``(dataset, size, seed, config)`` on demand, so a record only carries indices.
"""
from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Mapping

from ring_jax.config import check_int, fail
from ring_jax.data.tasks.base import MAX_SPLIT_DRAWS, PromptRecord, Task, last_boxed


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """Inverse of `_freeze` for the config (pairs back to a dict at the top level only)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in value}


@functools.lru_cache(maxsize=64)
def _dataset(name: str, size: int, seed: int, config: tuple):
    import reasoning_gym
    return reasoning_gym.create_dataset(name, size=size, seed=seed, **_thaw(config))


@dataclasses.dataclass(frozen=True)
class GymTask(Task):
    dataset: str = "chain_sum"
    size: int = 1000
    config: Any = ()  # a dict of generator options; stored frozen (hashable)

    def __post_init__(self):
        super().__post_init__()
        check_int("size", self.size, min_value=1)
        object.__setattr__(self, "config", _freeze(self.config or {}))
        try:
            from reasoning_gym.factory import DATASETS
        except ImportError:
            fail("task", f"gym/{self.dataset}",
                 "needs the optional reasoning-gym package: pip install 'ring_jax[gym]'")
        if self.dataset not in DATASETS:
            fail("dataset", self.dataset, f"must be a reasoning-gym dataset: {sorted(DATASETS)}")

    @property
    def name(self) -> str:
        return f"gym/{self.dataset}"

    @property
    def num_examples(self) -> int:
        return self.size

    def _entry(self, index: int, seed: int) -> dict:
        return _dataset(self.dataset, self.size, seed, self.config)[index % self.size]

    def sample(self, index: int, seed: int) -> PromptRecord:
        """Item ``index`` of the generated set, or, when it lies outside this task's split
        (`Task.in_split`), the first item in the split at indices probed by a hash of
        (index, attempt); the record's ``index`` is the item's own (what `score` looks up)."""
        for attempt in range(MAX_SPLIT_DRAWS):
            item = index if attempt == 0 else zlib.crc32(f"{index}/{attempt}".encode())
            entry = self._entry(item, seed)
            if self.in_split(entry["question"]):
                return PromptRecord(task=self.name, index=item % self.size, seed=seed,
                                    prompt=entry["question"], answer=str(entry["answer"]),
                                    thoughts=None, metadata={})
        fail("eval_fraction", self.eval_fraction,
             f"{self.name} found no item of split {self.split!r} in {MAX_SPLIT_DRAWS} draws "
             f"(size={self.size}); raise size or change eval_fraction")

    def _sample(self, rng, size):  # `sample` is overridden: items come from reasoning-gym
        raise NotImplementedError("gym tasks sample reasoning-gym items, see `sample`")

    def _score(self, record, answer_region):
        boxed = last_boxed(answer_region)
        answer = (boxed if boxed is not None else answer_region).strip()
        if not answer:
            return {"answer_parsed": False, "correct": False}
        ds = _dataset(self.dataset, self.size, record.seed, self.config)
        score = float(ds.score_answer(answer=answer, entry=ds[record.index % self.size]))
        return {"answer_parsed": True, "correct": score >= 1.0, "reward": score}
