"""Moving arrays between the trainer's mesh, the rollout engine and the host, one process or
many (PAPER §3 hybrid runtime).

Where the engine runs is `EngineMeshConfig` (the config's ``mesh.engine`` section):

  layout="per_host"   one process: the engine runs co-located on the training mesh and takes
                      the trainer's variables as they are. Several processes (one controller per
                      host): every host runs the same engine on its local devices with a full
                      copy of the weights (gathered to the host at every sync), so all hosts hold
                      identical rollouts and the engine never reads arrays another host owns.
                      Fastest for models whose weights fit one host.
  layout="global"     one engine program over the pod-wide mesh, driven by every process
                      (multi-controller SPMD): experts split over ``expert``, attention and the
                      KV cache over the batch / tensor axes, so a model no host could hold
                      decodes. The weight sync never leaves the devices: the engine reshards the
                      trainer's arrays into its own layout and casts them in one program
                      (`ring_jax.rollout.weight_sync`).
  placement="colocated"       the engine uses the trainer's devices (its mesh: the training
                              mesh, or ``mesh.engine.{data,fsdp,expert,tensor}`` over the same
                              devices);
  placement="disaggregated"   the engine has ``mesh.engine.num_devices`` devices of its own (the
                              last ones), the trainer the rest: the paper's hybrid runtime.

Either way the scheduler's decisions are functions of state every process shares, so every
process issues the same engine programs in the same order. Host batches, identical on every
process, become global arrays split over the batch axes (`to_global`).
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ring_jax import config as config_lib
from ring_jax import sharding

LAYOUTS = ("per_host", "global")
PLACEMENTS = ("colocated", "disaggregated")


@dataclasses.dataclass(frozen=True)
class EngineMeshConfig:
    """Where the rollout engine runs (module docstring). ``data/fsdp/expert/tensor``: the
    engine mesh's sizes over its devices (an axis left at 0 has size 1, -1 on one axis takes
    the rest); all 0 (default): the training mesh itself (colocated) or data-parallel over the
    engine's devices (disaggregated)."""

    layout: str = "per_host"
    placement: str = "colocated"
    num_devices: int = 0  # disaggregated: the engine's devices (the last ones); trainer: the rest
    data: int = 0
    fsdp: int = 0
    expert: int = 0
    tensor: int = 0

    def _sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in sharding.MESH_AXES}

    def __post_init__(self):
        config_lib.check_one_of("layout", self.layout, LAYOUTS)
        config_lib.check_one_of("placement", self.placement, PLACEMENTS)
        config_lib.check_int("num_devices", self.num_devices, min_value=0)
        sizes = self._sizes()
        for name, size in sizes.items():
            config_lib.check(isinstance(size, int) and not isinstance(size, bool) and size >= -1,
                             name, size, "must be 0 (all axes: the default layout), -1 (the "
                             "remaining devices) or a positive int")
        if not self.uses_default_shape:
            config_lib.check(list(sizes.values()).count(-1) <= 1, "data", sizes,
                             "at most one axis may be -1")
            config_lib.check(self.layout == "global", "layout", self.layout,
                             "must be 'global' to give the engine mesh its own axis sizes (a "
                             "per_host engine is data-parallel over each host's devices)")
        if self.placement == "disaggregated":
            config_lib.check(self.layout == "global", "layout", self.layout,
                             "must be 'global' with placement='disaggregated' (the engine's "
                             "sub-mesh spans the pod)")
            config_lib.check(self.num_devices >= 1, "num_devices", self.num_devices,
                             "must be >= 1 with placement='disaggregated' (the engine's devices)")
        else:
            config_lib.check(self.num_devices == 0, "num_devices", self.num_devices,
                             "must be 0 with placement='colocated' (the engine shares the "
                             "trainer's devices)")

    @property
    def uses_default_shape(self) -> bool:
        return all(v == 0 for v in self._sizes().values())

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Axis sizes over the engine's ``num_devices`` devices (explicit sizes only)."""
        sizes = fill_remaining_axis(
            {a: max(s, 1) if s != -1 else -1 for a, s in self._sizes().items()},
            num_devices, "mesh.engine.", f"the engine's {num_devices} devices")
        config_lib.check(int(np.prod(list(sizes.values()))) == num_devices, "mesh.engine",
                         sizes, f"the axis sizes must multiply to the engine's {num_devices} "
                         "devices")
        return sizes


def fill_remaining_axis(sizes: dict[str, int], num_devices: int, field_prefix: str,
                        devices: str) -> dict[str, int]:
    """``sizes`` with its -1 axis (at most one) taking the devices the others leave; a
    `ConfigError` naming ``field_prefix + axis`` when the others do not divide ``num_devices``
    (described as ``devices`` in the message)."""
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    sizes = dict(sizes)
    for name, size in sizes.items():
        if size == -1:
            config_lib.check(num_devices % fixed == 0, f"{field_prefix}{name}", size,
                             f"the other axes ({fixed}) must divide {devices}")
            sizes[name] = num_devices // fixed
    return sizes


def engine_mesh(mesh, config: EngineMeshConfig = EngineMeshConfig()):
    """The engine's mesh (module docstring) given the training ``mesh``."""
    if config.layout == "per_host":
        if jax.process_count() == 1:
            return mesh
        return sharding.make_mesh(data=jax.local_device_count(), devices=jax.local_devices())
    if config.placement == "colocated":
        devices = list(mesh.devices.flat)
        if config.uses_default_shape:
            return mesh
    else:
        if jax.process_count() > 1:
            config_lib.fail("mesh.engine.placement", config.placement,
                            "'disaggregated' runs in one process only: moving weights between "
                            "disjoint device sets of several processes needs a cross-host "
                            "transfer this backend lacks; use 'colocated' with layout='global'")
        devices = jax.devices()[-config.num_devices:]
        overlap = set(devices) & set(mesh.devices.flat)
        config_lib.check(not overlap, "mesh.engine.num_devices", config.num_devices,
                         f"the training mesh {dict(mesh.shape)} and the engine's last "
                         f"{config.num_devices} of {jax.device_count()} devices overlap")
        if config.uses_default_shape:
            return sharding.make_mesh(data=len(devices), devices=devices)
    return sharding.make_mesh(**config.resolve(len(devices)), devices=devices)


def to_engine(variables, config: EngineMeshConfig = EngineMeshConfig()):
    """Trainer variables as the engine takes them: unchanged on one process or with a global
    engine (it reshards them on device, `rollout.weight_sync`); gathered to host (one full copy
    per process) for per-host engines when the training mesh spans processes."""
    if jax.process_count() == 1 or config.layout == "global":
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
