"""Weight sync trainer → engine on device (PAPER §3: ASystem reshards 1T weights in place,
with no host round trip).

The engine's conversion (`precision.prepare_variables`: cast to the inference dtype, optional
perturbations) is one jitted program whose ``out_shardings`` are the engine's weight layout, so
a trainer array on the engine's devices is resharded and cast by that one program. XLA's
partitioner moves each shard straight to the device that needs it (all-to-all / collective
permutes over ICI, DCN between processes). `reshard` only handles what one program cannot:

  * same devices in another order (the engine's mesh laid out differently over the trainer's
    devices): `jax.device_put` to the engine's layout, a device-to-device reshard (across
    processes too, the device set being the same);
  * other devices of the same process (a disaggregated engine on its own sub-mesh, one
    process): `jax.device_put`, device to device;
  * host arrays (a per-host engine's gathered weights): left to the program, which places them.

Disjoint device sets owned by several processes need a cross-host transfer (DCN) that the CPU
backend lacks; `multihost.engine_mesh` refuses that layout before anything compiles.
"""
from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding


def device_order(sharding: Any) -> tuple[Any, ...]:
    """The ordered device list a jitted program over ``sharding`` runs on."""
    if isinstance(sharding, NamedSharding):
        return tuple(sharding.mesh.devices.flat)
    return tuple(sorted(sharding.device_set, key=lambda d: d.id))


def needs_transfer(x: Any, target: Any) -> bool:
    """Whether device array ``x`` must move before a program over ``target`` can read it."""
    return isinstance(x, jax.Array) and device_order(x.sharding) != device_order(target)


def reshard(variables: Any, shardings: Any) -> Any:
    """``variables`` (trainer layout, trainer dtype) readable by a program over ``shardings``'
    devices: unchanged when they are already on those devices in that order (the engine's
    conversion program reshards them as it casts), else moved device to device into
    ``shardings`` (module docstring). ``shardings=None`` (an engine without a mesh): unchanged.
    """
    if shardings is None:
        return variables
    engine = jax.tree.leaves(shardings)[0]  # the engine's weights share one mesh
    if not any(needs_transfer(x, engine) for x in jax.tree.leaves(variables)):
        return variables
    return jax.device_put(variables, shardings)
