"""Donating the train state to the RL step (``rl.donate_state``) without invalidating what else
holds its arrays.

With donation XLA writes the new state into the old one's buffers (the step's output costs no
memory of its own: 11.3 GiB per chip for Ling-1T on a v5p-512, BUILD.md "Will it fit?"), and
the old arrays are deleted. On one process the engine's weights are the trainer's own arrays
(`multihost.to_engine` hands them over unchanged, and the engine may keep an array it does not
cast), and the scheduler keeps the pending version until its next iteration boundary, while a
rollout may still run on it. `unaliased` gives those holders their own copy of every array
that shares a device buffer with the state, so the next donated step deletes nothing they use.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _buffer_pointers(x) -> set[int]:
    if not isinstance(x, jax.Array) or x.is_deleted():
        return set()
    return {shard.data.unsafe_buffer_pointer() for shard in x.addressable_shards}


def unaliased(tree: Any, owner: Any) -> Any:
    """``tree`` with each `jax.Array` leaf that shares a device buffer with a leaf of ``owner``
    replaced by a copy (same value, same sharding); other leaves (host arrays, arrays of their
    own) are returned as they are."""
    owned = set().union(*map(_buffer_pointers, jax.tree.leaves(owner)))

    def own(x):
        return jnp.copy(x) if _buffer_pointers(x) & owned else x
    return jax.tree.map(own, tree)
