"""The aux-loss-free router-bias step of a train step (PAPER §4), on the model's 'router' tree.

The model keeps one expert-bias vector [E] per MoE layer in its 'router' collection
({'layers_<i>': {'moe': {'expert_bias': [E]}}}) and reports the tokens each expert received in
aux['moe/load'] [L_moe, E], MoE layers in increasing layer order. This module lines the two up
(numeric layer order: 'layers_10' comes after 'layers_2') and applies
`ring_jax.model.update_expert_bias` outside the gradient.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

from ring_jax.model import update_expert_bias

_LAYER_RE = re.compile(r"layers_(\d+)$")


def _layer_index(path) -> int:
    for key in path:
        name = getattr(key, "key", getattr(key, "name", None))
        match = _LAYER_RE.match(str(name))
        if match:
            return int(match.group(1))
    raise ValueError(f"router variable {jax.tree_util.keystr(path)} has no 'layers_<i>' key")


def _ordered_leaves(router: Any) -> tuple[list[int], list[jax.Array], Any]:
    """Leaves of `router` and their positions in flatten order, sorted by layer index."""
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(router)
    order = sorted(range(len(path_leaves)), key=lambda i: _layer_index(path_leaves[i][0]))
    return order, [path_leaves[i][1] for i in order], treedef


def stack_expert_bias(router: Any) -> jax.Array:
    """bias_LE [L_moe, E], MoE layers in increasing layer order (the order of aux['moe/load'])."""
    _, leaves, _ = _ordered_leaves(router)
    return jnp.stack(leaves)


def update_router_bias(router: Any, load_LE: jax.Array, rate: float) -> Any:
    """The router tree after one bias step from the per-layer expert loads; rate 0 -> unchanged."""
    order, leaves, treedef = _ordered_leaves(router)
    if not leaves or rate == 0:
        return router
    if load_LE.shape != (len(leaves), leaves[0].shape[-1]):
        raise ValueError(f"load_LE shape {load_LE.shape} does not match {len(leaves)} MoE "
                         f"layers x {leaves[0].shape[-1]} experts")
    bias_LE = jnp.stack(leaves)
    new_LE = update_expert_bias(bias_LE.astype(jnp.float32), load_LE.astype(jnp.float32),
                                rate).astype(bias_LE.dtype)
    new_leaves = [None] * len(leaves)
    for row, flat_index in enumerate(order):
        new_leaves[flat_index] = new_LE[row]
    return jax.tree_util.tree_unflatten(treedef, new_leaves)
