"""Where the engine's slots and KV cache live on a mesh (issue 19: the rollout engine across a pod).

The training rules (`sharding.LOGICAL_RULES`) split a batch over every batch mesh axis
(``act_batch`` = data, fsdp, expert) and keep the KV cache's length axis whole. The engine's
decode batch is its slot count, fixed by config, and on a pod-wide mesh it often does not divide
by the product of every batch axis (256 slots on fsdp 8 × expert 64 = 512 devices). Splitting the
slots over a dividing prefix of the axes (fsdp only) then leaves each chip with 32 slots' whole
cache, 80 GiB for Ling-1T. The engine therefore uses its own layout:

  * slots over the batch axes with the largest product that divides ``num_slots`` (any subset,
    not a prefix: 256 slots take expert 64, 4 per chip, rather than fsdp 8). Ties go to the axis
    later in ``act_batch`` (expert before fsdp): tokens split over the expert axis need no
    repeated expert dispatch, while tokens replicated over it are all-gathered once per copy;
  * the KV cache's length axis (``cache_len``) over the batch axes the slots left unused whose
    product divides ``max_len`` (greedy, in rule order). The decode attention then runs over a
    slice of every slot's keys on each chip; XLA's partitioner inserts the all-reduces of the
    softmax's max and sum and of the output's partial sums over those axes (exact up to float
    summation order, which `tests/multidevice/test_engine_layout.py` checks token for token).

Mesh axes of size one are always kept in the slot axes (they cost nothing), so when the slot count
divides every batch axis the layout is the training rules' own: nothing changes for per-host
engines or small meshes.

`EngineLayout.rules` is the rules table the engine's forward is traced under
(`engine.model_functions`), so the model's own constraints (activations, the cache write in
`model.layers.write_cache`, the MoE dispatch's `shard_map` specs) follow the same layout as the
engine's slot state (`engine._slot_state_sharding`). Parameters keep the training rules.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

from ring_jax import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class EngineLayout:
    """Mesh axes of the slot (decode batch) axis and of the KV cache's length axis."""

    slot_axes: tuple[str, ...]
    cache_len_axes: tuple[str, ...]

    def rules(self, base: sharding_lib.Rules = sharding_lib.LOGICAL_RULES) -> sharding_lib.Rules:
        """``base`` with ``act_batch`` -> the slot axes and ``cache_len`` -> the cache axes."""
        replace = {"act_batch": self.slot_axes or None,
                   "cache_len": self.cache_len_axes or None}
        return tuple((name, replace.get(name, axes)) for name, axes in base)


def _batch_axes(rules: sharding_lib.Rules) -> tuple[str, ...]:
    axes = dict(rules).get("act_batch")
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def engine_layout(mesh: Any, num_slots: int, max_len: int,
                  rules: sharding_lib.Rules = sharding_lib.LOGICAL_RULES) -> EngineLayout:
    """The engine's layout of ``num_slots`` slots of ``max_len`` cache positions on ``mesh``
    (module docstring)."""
    axes = [a for a in _batch_axes(rules) if a in mesh.axis_names]
    unit = [a for a in axes if mesh.shape[a] == 1]
    split = [a for a in axes if mesh.shape[a] > 1]

    def score(subset: tuple[str, ...]) -> tuple[int, int]:
        # Largest product first; among equal products the axes later in act_batch.
        return (math.prod(mesh.shape[a] for a in subset),
                sum(2 ** split.index(a) for a in subset))

    dividing = [s for r in range(len(split) + 1) for s in itertools.combinations(split, r)
                if num_slots % math.prod(mesh.shape[a] for a in s) == 0]
    chosen = set(max(dividing, key=score)) | set(unit)
    slot_axes = tuple(a for a in axes if a in chosen)
    cache_len_axes, size = [], 1
    for a in split:
        if a not in chosen and max_len % (size * mesh.shape[a]) == 0:
            cache_len_axes.append(a)
            size *= mesh.shape[a]
    return EngineLayout(slot_axes, tuple(cache_len_axes))
