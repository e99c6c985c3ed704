"""Weight sync trainer → engine on device (PAPER §3: ASystem reshards 1T weights in place,
with no host round trip).

`WeightSync` is what `Engine` runs on every `load_weights`. For the trainer's device arrays
it takes two steps, each on device:

  1. convert in place: the engine's conversion (`precision.prepare_variables`: cast to the
     inference dtype, optional perturbations) as one jitted program whose outputs keep the
     trainer's layout, on the trainer's devices. Every op of the conversion is elementwise
     or a max (fp8 scales: exact in any order), and `jax.random` draws do not depend on the
     layout, so this is bit-for-bit the conversion done in the engine's layout (tested);
  2. move: `jax.device_put` of the converted arrays into the engine's shardings, device to
     device (nothing when the layouts already agree: the engine on the training mesh). The
     move carries the engine's dtype, so a bf16 engine moves half the bytes of the trainer's
     fp32 weights; in one process the runtime copies shard slices straight to the devices
     that need them, across processes it runs a jitted reshard (collectives over ICI / DCN).

Converting inside the move instead (one program with the engine's ``out_shardings``) left
the reshard to XLA's SPMD partitioner, which on the CPU backend re-materialises whole arrays
on every device for an fsdp → expert layout change ("Involuntary full rematerialization"):
9.1x a plain copy of the trainer's weights for a bf16 engine there, 2.3x in two steps
(`experiments/BENCHMARKS.md`, weight sync).

Host arrays (a per-host engine's gathered weights) and engines without a mesh keep the one
program with the engine's ``out_shardings``, which places them; device arrays that are not all
on one named mesh are moved into the engine's layout first, then converted there.

Memory: step 1 holds the converted copy on the trainer's devices until step 2 has moved it
(half the trainer's fp32 weights for a bf16 engine); a disaggregated engine's devices only
ever receive the converted arrays.

Disjoint device sets owned by several processes need a cross-host transfer (DCN) that the CPU
backend lacks; `multihost.engine_mesh` refuses that layout before anything compiles.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import NamedSharding

Prepare = Callable[[Any, Any], Any]  # (trainer variables, version) -> engine variables


class WeightSync:
    """Trainer variables → the engine's, on device (module docstring).

    ``prepare_weights(variables, version)``: the engine's conversion (jittable, layout-free);
    ``shardings``: the engine's weight layout (a pytree like the output), None for an engine
    without a mesh. Each distinct trainer layout compiles its in-place conversion once.
    """

    def __init__(self, prepare_weights: Prepare, shardings: Any = None):
        self._prepare = prepare_weights
        self._shardings = shardings
        self._into_engine_layout = jax.jit(prepare_weights, out_shardings=shardings)
        self._in_place: dict[Any, Any] = {}  # trainer layout -> its jitted conversion

    def __call__(self, variables: Any, version: Any) -> Any:
        leaves, treedef = jax.tree.flatten(variables)
        mesh = _common_mesh(leaves)
        if self._shardings is None or mesh is None:
            # Host arrays: the program places them; device arrays not on one mesh are moved
            # into the engine's layout first (jit wants one device order).
            if self._shardings is not None and any(isinstance(x, jax.Array) for x in leaves):
                variables = reshard(variables, self._shardings)
            return self._into_engine_layout(variables, version)
        layout = (treedef, tuple(x.sharding for x in leaves))
        if layout not in self._in_place:
            self._in_place[layout] = jax.jit(
                self._prepare, out_shardings=jax.tree.unflatten(treedef, layout[1]))
        with jax.set_mesh(mesh):  # the trainer's, whatever mesh the caller traces under
            converted = self._in_place[layout](variables, version)
        return reshard(converted, self._shardings)


def reshard(variables: Any, shardings: Any) -> Any:
    """``variables`` (device arrays) in ``shardings``, moved device to device (`jax.device_put`;
    an array already in its target sharding is returned as is)."""
    if all(getattr(x, "sharding", None) == s
           for x, s in zip(jax.tree.leaves(variables), jax.tree.leaves(shardings))):
        return variables
    return jax.device_put(variables, shardings)


def _common_mesh(leaves: list[Any]) -> Any:
    """The mesh every leaf lives on as a `NamedSharding` device array, else None."""
    meshes = {x.sharding.mesh if isinstance(x, jax.Array)
              and isinstance(x.sharding, NamedSharding) else None for x in leaves}
    return meshes.pop() if len(meshes) == 1 else None
