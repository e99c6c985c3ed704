"""Meshes over (data, fsdp, expert, tensor) and the one logical-axis rules table.

Model code names axes logically (params: ``("exp", "embed", "expert_mlp")``; activations:
``("act_batch", "act_len", "act_embed")``); `LOGICAL_RULES` maps them to mesh axes. The MoE
`shard_map` specs come from the same table (`spec_for`), so changing a rule moves parameters,
activations and expert dispatch together.

Usage::

    mesh = sharding.make_mesh(data=2, fsdp=1, expert=4, tensor=1)
    with sharding.use_mesh(mesh):
        shardings = sharding.param_shardings(mesh, sharding.param_logical_axes(model, tokens))
        params = jax.device_put(params, shardings)
        logits, aux = jax.jit(model.apply)(variables, tokens)

The optimizer state takes the params' layout (`optimizer_state_shardings`); meshes over a TPU
topology's devices may split physical torus axes when asked (`make_mesh`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

Rules = tuple[tuple[str, Any], ...]

# The rules table. Tokens are split over data, fsdp and expert (outside the MoE block the expert
# axis is one more data-parallel axis; inside it the all_to_all regroups tokens by expert).
LOGICAL_RULES: Rules = (
    # activations
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_len", None),
    # parameters. Rules apply in order and a mesh axis is used once per array: routed experts
    # take `expert` first, so their `embed` dim falls back to `fsdp`, while every other weight
    # (attention, embeddings, dense and shared MLPs, router) is split over fsdp × expert too
    # instead of being replicated across the expert axis.
    ("exp", "expert"),
    ("vocab", "tensor"),
    ("embed", ("fsdp", "expert")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert_mlp", "tensor"),
    ("router_exp", None),
    ("norm", None),
)


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None, *,
              allow_split_physical_axes: bool = False) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh with Auto axes (GSPMD propagation + shard_map).

    On TPU the devices are laid out along the physical torus (`mesh_utils.create_device_mesh`),
    which by default refuses a mesh axis that would cut a physical axis in pieces (fsdp=8,
    expert=8 on a 4x4x4 torus); ``allow_split_physical_axes`` accepts such shapes (collectives
    along a split axis then cross more links). ``devices`` may be real devices or a TPU
    topology's (`ring_jax.plan`, ahead-of-time compilation).
    """
    shape = (data, fsdp, expert, tensor)
    devices = list(jax.devices() if devices is None else devices)
    need = int(np.prod(shape))
    if need > len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {need} devices, "
                         f"have {len(devices)}")
    # As `jax.make_mesh`: v5e's 2-D torus is always split where needed.
    split = allow_split_physical_axes or devices[0].device_kind in ("TPU v5 lite", "TPU v5e")
    grid = mesh_utils.create_device_mesh(shape, devices[:need], allow_split_physical_axes=split)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 4)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Iterator[Mesh]:
    """Sets the mesh and the logical-axis rules for tracing the model under it."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh


def current_rules() -> Rules:
    """The rules of the enclosing `use_mesh` / `nn.logical_axis_rules`, else the default."""
    return tuple(nn.get_logical_axis_rules()) or LOGICAL_RULES


def _present(axes: Any, mesh: Any) -> Any:
    names = set(mesh.axis_names)
    if axes is None:
        return None
    if isinstance(axes, str):
        return axes if axes in names else None
    kept = tuple(a for a in axes if a in names)
    return kept if len(kept) > 1 else (kept[0] if kept else None)


def spec_for(logical_axes: Sequence[str | None], mesh: Any, rules: Rules | None = None) -> P:
    """PartitionSpec of an array with these logical axes on `mesh` (axes it lacks dropped)."""
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules or current_rules())
    return P(*(_present(a, mesh) for a in spec))


def batch_mesh_axes(mesh: Any, batch_size: int, rules: Rules | None = None) -> tuple[str, ...]:
    """Mesh axes the batch is split over: those of 'act_batch' (in order) whose product still
    divides `batch_size` (a decode batch smaller than the mesh stays partly replicated)."""
    axes = dict(rules or current_rules()).get("act_batch")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept, size = [], 1
    for a in axes:
        if a in mesh.axis_names and batch_size % (size * mesh.shape[a]) == 0:
            kept.append(a)
            size *= mesh.shape[a]
    return tuple(kept)


def param_logical_axes(model: nn.Module, *init_args, **init_kwargs) -> Any:
    """Pytree of logical-axis-name tuples for every variable of `model` (no allocation)."""
    boxed = jax.eval_shape(lambda: nn.Module.init(model, jax.random.key(0), *init_args,
                                                  **init_kwargs))
    return jax.tree.map(lambda x: tuple(x.names) if isinstance(x, nn.LogicallyPartitioned)
                        else (None,) * len(x.shape), boxed,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def param_shardings(mesh: Mesh, logical_axes: Any, rules: Rules | None = None) -> Any:
    """NamedShardings for a pytree of logical-axis tuples (from `param_logical_axes`, or
    `ring_jax.model.cache_logical_axes` for the KV cache)."""
    rules = rules or current_rules()
    return jax.tree.map(lambda axes: NamedSharding(mesh, spec_for(axes, mesh, rules)),
                        logical_axes, is_leaf=_is_axes)


def batch_sharding(mesh: Mesh, batch_size: int, ndim: int = 2,
                   rules: Rules | None = None) -> NamedSharding:
    """Sharding of a [B, ...] input: batch split over the batch axes that divide it."""
    axes = batch_mesh_axes(mesh, batch_size, rules)
    return NamedSharding(mesh, P(axes or None, *([None] * (ndim - 1))))


def optimizer_state_shardings(tx: optax.GradientTransformation, params: Any,
                              params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of ``tx.init(params)``: every params-shaped part of the state (AdamW's μ and ν)
    laid out like the params, the rest (step counts) replicated. (``jax.jit(tx.init)`` alone
    leaves the layout to XLA, which replicates the zeros: a whole optimizer state per device.)
    """
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(
        tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params), params_shardings,
        transform_non_params=lambda _: replicated)
