"""TPU topologies for ahead-of-time compilation: names, HBM per device, meshes.

`jax.experimental.topologies.get_topology_desc` describes a TPU slice without owning one; it
needs the ``libtpu`` package (``pip install -e ".[tpu-aot]"``), which holds the TPU compiler.
A topology name is ``<generation>:<chips per torus axis>`` as libtpu spells it: ``v5p:4x4x4``
(64 chips), ``v6e:8x8``, ``v5e:4x4``, ``v4:2x2x2``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

from ring_jax import sharding
from ring_jax.config import ConfigError

GiB = 2**30

# HBM per chip in bytes (Cloud TPU system-architecture pages). A device as JAX sees it may be
# a part of a chip (v4's two TensorCores without megacore), so `hbm_per_device` divides by the
# devices per chip of the described topology.
HBM_PER_CHIP: dict[str, int] = {
    "v2": 16 * GiB,
    "v3": 32 * GiB,
    "v4": 32 * GiB,
    "v5e": 16 * GiB,
    "v5p": 95 * GiB,
    "v6e": 32 * GiB,
}

INSTALL_HINT = ('ahead-of-time TPU compilation needs libtpu: pip install -e ".[tpu-aot]" '
                '(works on a CPU-only machine)')

_NAME = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+)*)$")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A described TPU slice: its name, generation, chips and devices (no hardware needed)."""

    name: str
    generation: str
    num_chips: int
    devices: tuple[Any, ...]

    @property
    def hbm_per_device(self) -> int:
        return HBM_PER_CHIP[self.generation] * self.num_chips // len(self.devices)


def parse_topology_name(name: str) -> tuple[str, int]:
    """``"v5p:4x4x4"`` -> ("v5p", 64); a one-line `ConfigError` naming the allowed forms."""
    m = _NAME.match(name)
    if not m or m.group(1) not in HBM_PER_CHIP:
        raise ConfigError(f"topology={name!r} is invalid: must be <generation>:<AxBxC> with "
                          f"generation one of {sorted(HBM_PER_CHIP)}, e.g. v5p:4x4x4 or v6e:8x8")
    return m.group(1), math.prod(int(x) for x in m.group(2).split("x"))


def get_topology(name: str) -> Topology:
    """The described slice; raises `ImportError` with the install command without libtpu."""
    generation, num_chips = parse_topology_name(name)
    try:
        import libtpu  # noqa: F401  (only its presence is checked; JAX loads it)
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    # libtpu holds a machine-wide lock file unless told otherwise; compiling for a described
    # slice touches no TPU, so several planners (and test processes) may load it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
    return Topology(name, generation, num_chips, tuple(desc.devices))


def parse_mesh(spec: str) -> dict[str, int]:
    """``"fsdp=8,expert=8"`` -> {"fsdp": 8, "expert": 8}; axes are `sharding.MESH_AXES`."""
    sizes = {}
    for item in filter(None, spec.split(",")):
        axis, _, size = item.partition("=")
        if axis not in sharding.MESH_AXES or not size.isdigit() or int(size) < 1:
            raise ConfigError(f"mesh={spec!r} is invalid: must be comma-separated axis=size with "
                              f"axis one of {sharding.MESH_AXES} and size a positive int")
        sizes[axis] = int(size)
    return sizes


def make_mesh(topology: Topology, sizes: dict[str, int], *,
              allow_split_physical_axes: bool = False, last: bool = False) -> Any:
    """A `ring_jax.sharding` mesh over the first prod(sizes) devices of the topology (the last
    ones with ``last``: a disaggregated engine's sub-mesh)."""
    devices = topology.devices[-math.prod(sizes.values()):] if last else topology.devices
    try:
        return sharding.make_mesh(**sizes, devices=devices,
                                  allow_split_physical_axes=allow_split_physical_axes)
    except (ValueError, NotImplementedError, AssertionError) as e:
        hint = ("" if allow_split_physical_axes else
                "; --allow_split_physical_axes accepts axes that split the physical torus")
        raise ConfigError(f"mesh={sizes} does not fit topology {topology.name} "
                          f"({len(topology.devices)} devices): {e}{hint}") from None
