"""Moving arrays between the trainer's mesh, the rollout engine and the host, one process or
many (PAPER §3 hybrid runtime).

One process: the engine runs co-located on the training mesh and takes the trainer's variables
as they are. Several processes (one controller per host): every host runs the same engine on
its local devices with a full copy of the weights, so all hosts hold identical rollouts (the
scheduler's decisions are functions of shared state) and the engine never reads arrays another
host owns; host batches, identical on every process, become global arrays split over the batch
axes.
"""
from __future__ import annotations

import jax
import numpy as np

from ring_jax import sharding


def engine_mesh(mesh):
    """The engine's devices: the training mesh (one process) or each process's local devices."""
    if jax.process_count() == 1:
        return mesh
    return sharding.make_mesh(data=jax.local_device_count(), devices=jax.local_devices())


def to_engine(variables):
    """Trainer variables as the engine takes them: unchanged on one process; gathered to host
    (one full copy per process) when the training mesh spans processes."""
    if jax.process_count() == 1:
        return variables
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(variables, tiled=True)


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """The host batch (identical on every process) as global arrays split over the batch axes."""
    out = {}
    for k, v in batch.items():
        sharding_v = sharding.batch_sharding(mesh, v.shape[0], v.ndim)
        out[k] = jax.make_array_from_callback(v.shape, sharding_v, lambda idx, v=v: v[idx])
    return out


def to_host(tree):
    """Replicated (scalar) outputs of the train step as numpy, on every process."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
