"""The scheduler's checkpoint: `SchedulerState`, and its encoding as a flat dict of numpy arrays.

`SchedulerState` holds every value a resumed scheduler needs, as one list of dataclass fields;
`Scheduler.state_dict` / `load_state_dict` save and restore it generically (each field through
its codec, declared next to the field), so a new field is one line here and nothing else.

`encode` / `decode`: the nested state (lists, dicts, strings, numbers, numpy arrays) is split
into a JSON skeleton, stored as a uint8 array under ``"meta_json"``, and one flat array per
dtype (``"data_int32"``, ...) holding every numpy array's values back to back; the skeleton
records each array's dtype, offset and shape. A few large arrays instead of thousands of
per-request ones keep checkpoints fast whatever the buffer size, and any checkpointer (orbax,
np.savez) stores them.
"""
from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any, Callable

import numpy as np

from ring_jax.scheduler.groups import Group

FORMAT = 2  # 2: groups_completed replaces batches_generated; bump when a field's meaning changes; `from_tree` refuses other formats

_ARRAY = "__ndarray__"
_TUPLE = "__tuple__"


def encode(tree: Any) -> dict[str, np.ndarray]:
    """Nested JSON-able structure with numpy arrays → flat dict of numpy arrays."""
    chunks: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}

    def walk(x):
        if isinstance(x, np.ndarray):
            if x.dtype.kind not in "biuf":
                raise TypeError(f"scheduler state: cannot store array of dtype {x.dtype}")
            name = np.dtype(x.dtype).name
            offset = sizes.get(name, 0)
            chunks.setdefault(name, []).append(x.reshape(-1))
            sizes[name] = offset + x.size
            return {_ARRAY: [name, offset, list(x.shape)]}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, dict):
            for k in x:
                if not isinstance(k, str):
                    raise TypeError(f"scheduler state: dict keys must be str, got {k!r}")
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, tuple):
            return {_TUPLE: [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"scheduler state: cannot store a {type(x).__name__} ({x!r:.80})")

    skeleton = walk(tree)
    out = {"meta_json": np.frombuffer(json.dumps(skeleton).encode(), np.uint8).copy()}
    for name, parts in chunks.items():
        out[f"data_{name}"] = np.concatenate(parts)
    return out


def decode(flat: dict[str, Any]) -> Any:
    """Inverse of `encode` (accepts arrays restored by any checkpointer)."""
    skeleton = json.loads(np.asarray(flat["meta_json"], np.uint8).tobytes().decode())
    data = {k[len("data_"):]: np.asarray(v) for k, v in flat.items() if k.startswith("data_")}

    def walk(x):
        if isinstance(x, dict):
            if _ARRAY in x:
                name, offset, shape = x[_ARRAY]
                size = int(np.prod(shape, dtype=np.int64))
                return data[name][offset:offset + size].astype(name).reshape(shape).copy()
            if _TUPLE in x:
                return tuple(walk(v) for v in x[_TUPLE])
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(skeleton)


def _codec(encode_fn: Callable[[Any], Any], decode_fn: Callable[[Any], Any]) -> dict:
    return {"encode": encode_fn, "decode": decode_fn}


_GROUPS_BY_ID = _codec(lambda groups: [g.to_tree() for g in groups.values()],
                       lambda trees: {t["group_id"]: Group.from_tree(t) for t in trees})
_GROUP_QUEUE = _codec(lambda groups: [g.to_tree() for g in groups],
                      lambda trees: collections.deque(Group.from_tree(t) for t in trees))
_PAIRS = _codec(lambda pairs: [list(p) for p in pairs], lambda lists: [tuple(p) for p in lists])
_PAIR_QUEUE = _codec(lambda pairs: [list(p) for p in pairs],
                     lambda lists: collections.deque(tuple(p) for p in lists))
_COUNTER = _codec(dict, collections.Counter)


@dataclasses.dataclass
class SchedulerState:
    """Everything a resumed scheduler needs, taken at an iteration boundary (nothing in the
    engine or the reward pool then). Fields without a codec are stored as they are."""

    version: int = 0  # newest weights the trainer published
    initial_version: int = 0  # version at construction (async: batch n uses v0 + n - k)
    iteration: int = 0  # rollout iterations run
    next_group_id: int = 0
    groups_completed: int = 0  # groups that reached the ready queue (paces the producer)
    batches_emitted: int = 0  # batches handed to the trainer
    source_exhausted: bool = False
    # (prompt record, retries) of purged prompts waiting to be admitted again
    requeue: collections.deque = dataclasses.field(default_factory=collections.deque,
                                                   metadata=_PAIR_QUEUE)
    # admitted, not yet complete, by group id
    groups: dict[int, Group] = dataclasses.field(default_factory=dict, metadata=_GROUPS_BY_ID)
    # (group id, sample index) of the unfinished responses drained at the last cut
    buffer: list[tuple[int, int]] = dataclasses.field(default_factory=list, metadata=_PAIRS)
    # complete groups with advantages, in group-id order, waiting for a batch
    ready: collections.deque = dataclasses.field(default_factory=collections.deque,
                                                 metadata=_GROUP_QUEUE)
    totals: collections.Counter = dataclasses.field(default_factory=collections.Counter,
                                                    metadata=_COUNTER)  # sched/total/*
    prompt_iterator: Any = None  # the prompt iterator's get_state(), filled in at save time

    def to_tree(self) -> dict[str, Any]:
        """Every field through its codec (an `encode`-able nested structure)."""
        tree = {"format": FORMAT}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            tree[field.name] = field.metadata["encode"](value) if field.metadata else value
        return tree

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> SchedulerState:
        if tree.get("format") != FORMAT:
            raise ValueError(f"unknown scheduler state format {tree.get('format')}")
        values = {}
        for field in dataclasses.fields(cls):
            value = tree[field.name]
            values[field.name] = field.metadata["decode"](value) if field.metadata else value
        return cls(**values)
