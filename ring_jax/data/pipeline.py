"""grain prompt pipelines: task mixtures → shuffled, repeated, tokenized, grouped prompt records.

    indices per source ── shuffle(seed_i) ── repeat(num_epochs) ─┐
                                                                  ├─ mix(weights) ─ sample +
    ...                                                           ┘  tokenize ─ repeat G (group)

Everything is a `grain.MapDataset`, i.e. a pure function of the position, so an iterator's
state is just its position (``{"next_index": n}``, JSON-able) and restoring it in a new process
continues with exactly the same records. Output records are plain dicts:

    prompt_id      int, position of the prompt draw in the stream (unique per draw)
    group_id       int, the group of G responses of this draw (== prompt_id)
    sample_index   0..G-1 within the group
    prompt_tokens  int32 [P], the chat-templated prompt (thinking section opened)
    prompt_text    the task's raw prompt
    task, index, seed, answer, thoughts, metadata_json   what ``Task.score`` needs
    source         which mixture component (int)

Each draw's G copies are consecutive, so a consumer taking G·n records gets n whole groups.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Sequence

import grain
import numpy as np

from ring_jax.config import check, check_float, check_int
from ring_jax.data.tasks.base import Task


@dataclasses.dataclass(frozen=True)
class PromptSource:
    """One mixture component: ``num_prompts`` problems (indices 0..n-1) of ``task`` per epoch.
    ``num_prompts=None`` uses the task's file length (math/code tasks expose ``num_examples``)."""
    task: Task
    weight: float = 1.0
    num_prompts: int | None = None

    def __post_init__(self):
        check_float("weight", self.weight, min_value=0.0, min_exclusive=True)
        n = self.size
        check(n is not None, "num_prompts", None,
              f"must be set for task {self.task.name!r} (it has no fixed number of examples)")
        check_int("num_prompts", n, min_value=1)

    @property
    def size(self) -> int | None:
        if self.num_prompts is not None:
            return self.num_prompts
        return getattr(self.task, "num_examples", None)


class _RepeatEachDataset(grain.MapDataset):
    """Element i of the parent becomes elements i*G .. i*G+G-1 (one group of G samples)."""

    def __init__(self, parent: grain.MapDataset, group_size: int):
        super().__init__(parent)
        self._group_size = group_size

    def __len__(self) -> int:
        return min(len(self._parent) * self._group_size, sys.maxsize)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        draw = self._parent[index // self._group_size]
        return {**draw, "sample_index": index % self._group_size}

    def __str__(self) -> str:
        return f"RepeatEachDataset(group_size={self._group_size})"


def prompt_dataset(sources: Sequence[PromptSource] | Task, tokenizer, *, seed: int = 0,
                   group_size: int = 1, num_epochs: int | None = 1, thinking: bool = True,
                   num_prompts: int | None = None) -> grain.MapDataset:
    """Prompt records for RL (DESIGN.md data flow step 1).

    Args:
      sources: mixture components, or a single task (then ``num_prompts`` sets its size).
      tokenizer: anything with ``encode`` and ``apply_chat_template`` (`ring_jax.data.tokenizer`).
      seed: problem set (``task.sample(index, seed)``) and shuffle order; same seed, same stream.
      group_size: G, responses per prompt (GRPO groups).
      num_epochs: passes over each source (reshuffled each epoch); None repeats forever.
      thinking: chat template mode, see `ring_jax.data.tokenizer`.
    """
    if isinstance(sources, Task):
        sources = [PromptSource(sources, num_prompts=num_prompts)]
    check(len(sources) > 0, "sources", sources, "must name at least one PromptSource")
    check_int("group_size", group_size, min_value=1)
    if num_epochs is not None:
        check_int("num_epochs", num_epochs, min_value=1)
    check_int("seed", seed, min_value=0)

    indices = []
    for i, src in enumerate(sources):
        ds = grain.MapDataset.range(src.size).shuffle(seed=(seed * 1_000_003 + i) % 2**32)
        indices.append(ds.repeat(num_epochs).map(lambda idx, i=i: (i, int(idx))))
    mixed = indices[0] if len(indices) == 1 else grain.MapDataset.mix(
        indices, [s.weight for s in sources])
    tasks = [s.task for s in sources]

    def draw(position: int, source_and_index: tuple[int, int]) -> dict[str, Any]:
        source, index = source_and_index
        record = tasks[source].sample(index, seed)
        chat = tokenizer.apply_chat_template(record.prompt, thinking=thinking)
        return {"prompt_id": position, "group_id": position, "source": source,
                "prompt_tokens": np.asarray(tokenizer.encode(chat), np.int32),
                "prompt_text": record.prompt, **record.to_dict()}

    return _RepeatEachDataset(mixed.map_with_index(draw), group_size)


def prompt_iterator(ds: grain.MapDataset, *, num_threads: int = 1,
                    prefetch: int = 16) -> grain.DatasetIterator:
    """An iterator with ``get_state() -> {"next_index": n}`` / ``set_state``; restoring the
    state (even in another process) continues with the identical records."""
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(read_options=options))
