"""Multi-process setup (jax.distributed) and process-0 helpers.

`maybe_initialize()` is the first thing `ring_jax.main` calls. It reads, in order of priority,
its arguments, then these environment variables (set by the scripts in launch/):

  RING_JAX_COORDINATOR     host:port of process 0's coordinator service
  RING_JAX_NUM_PROCESSES   number of processes
  RING_JAX_PROCESS_ID      this process's index
  RING_JAX_DISTRIBUTED     "auto": let JAX detect the cluster (SLURM, TPU pod, ...) itself

and does nothing for a single process. On CPU the cross-process collectives go through gloo
(JAX's default for CPU in this version; set explicitly so a changed default cannot silently
turn collectives off).

Every process runs the same program on the same data and takes the same decisions (the
scheduler is a pure function of shared state); `broadcast_from_main` is for the few host values
that could differ (a wall-clock-based decision, a value read from a file being written).

`python -m ring_jax.train.distributed` is a self-check of a launch: every process contributes
its global device ids to a cross-process psum and checks the total; it prints one line per
process and exits non-zero on a mismatch.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

ENV_COORDINATOR = "RING_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "RING_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "RING_JAX_PROCESS_ID"
ENV_MODE = "RING_JAX_DISTRIBUTED"

_initialized = False


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is invalid: must be an int")


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Initialises jax.distributed when the run has several processes. Returns whether it did.

    Must run before anything touches a JAX device. Calling it again is a no-op.
    """
    global _initialized
    if _initialized:
        return True
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    mode = os.environ.get(ENV_MODE, "")
    if mode not in ("", "auto", "off"):
        raise ValueError(f"environment variable {ENV_MODE}={mode!r} is invalid: "
                         "must be 'auto', 'off' or unset")
    if mode == "off":
        return False
    if mode == "auto":
        # Cluster auto-detection (SLURM, Open MPI, TPU pod metadata, ...).
        jax.distributed.initialize()
        _initialized = True
        return True
    if num_processes is None or num_processes == 1:
        return False
    missing = [name for name, value in ((ENV_COORDINATOR, coordinator_address),
                                        (ENV_PROCESS_ID, process_id)) if value is None]
    if missing:
        raise ValueError(f"num_processes={num_processes} needs {' and '.join(missing)} "
                         "(arguments or environment variables)")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} is invalid: must be in [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    _initialized = True
    return True


def is_main() -> bool:
    """True on process 0: the one that writes metrics, config.json and console output."""
    return jax.process_index() == 0


def broadcast_from_main(value: Any) -> Any:
    """Every process gets process 0's `value` (a pytree of numbers / numpy arrays).

    Single process: returned unchanged.
    """
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    out = multihost_utils.broadcast_one_to_all(jax.tree.map(np.asarray, value))
    return jax.tree.map(np.asarray, out)


def agree(decision: bool) -> bool:
    """Process 0's boolean decision (e.g. "stop now: time budget spent"), on every process."""
    return bool(broadcast_from_main(np.asarray(decision, np.bool_)))


def sync(name: str) -> None:
    """A barrier across processes (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def self_check() -> int:
    """Cross-process psum of global device ids + 1 over all devices; 0 when the sum is right."""
    mesh = jax.make_mesh((jax.device_count(),), ("x",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    local = [jax.device_put(np.full((1,), d.id + 1, np.int32), d)
             for d in mesh.local_devices]
    ids_X = jax.make_array_from_single_device_arrays((jax.device_count(),), sharding, local)
    total = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "x"), mesh=mesh,
                                  in_specs=jax.sharding.PartitionSpec("x"),
                                  out_specs=jax.sharding.PartitionSpec()))(ids_X)
    got = int(np.asarray(total.addressable_data(0))[0])
    want = sum(d.id + 1 for d in jax.devices())
    main_value = int(broadcast_from_main(np.int32(jax.process_index() + 100)))
    ok = got == want and main_value == 100
    print(f"[ring_jax.distributed] process {jax.process_index()}/{jax.process_count()} "
          f"devices local={jax.local_device_count()} global={jax.device_count()} "
          f"psum={got} expected={want} broadcast={main_value} {'OK' if ok else 'MISMATCH'}",
          flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    maybe_initialize()
    code = self_check()
    sync("ring_jax_self_check_done")
    if jax.process_count() > 1:
        jax.distributed.shutdown()
    raise SystemExit(code)
