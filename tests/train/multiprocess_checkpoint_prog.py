"""Run by test_distributed.py under launch/multiprocess_localhost.sh: a 2-process checkpoint
save + restore (host-local scalars and keys, a process-sharded array, JSON, ragged numpy).

Usage: python -m multiprocess_checkpoint_prog CHECKPOINT_DIR (with this folder on PYTHONPATH).
"""
import sys

import numpy as np

from ring_jax.train import distributed

# jax.distributed must start before anything touches a device.
distributed.maybe_initialize()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from ring_jax.train import checkpoint  # noqa: E402


def main(directory: str) -> int:
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    w = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3)
    w_sharded = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P("data")))(w)
    # "step" and "rng" live on one local device: the case orbax rejects without help.
    state = {"w": w_sharded, "step": jnp.asarray(5), "rng": jax.random.key(1)}
    with checkpoint.Checkpointer(directory) as ckpt:
        ckpt.save(5, state=state, meta={"next": 3},
                  arrays={"buf": [np.arange(3), np.arange(2)]})
        ckpt.wait()
    with checkpoint.Checkpointer(directory) as ckpt:
        target = {"w": jax.ShapeDtypeStruct((8, 3), jnp.float32,
                                            sharding=NamedSharding(mesh, P())),
                  "step": jnp.asarray(0), "rng": jax.random.key(0)}
        restored = ckpt.restore(target)
    ok = (np.array_equal(np.asarray(restored.state["w"].addressable_data(0)), np.asarray(w))
          and restored.meta == {"next": 3}
          and [a.tolist() for a in restored.arrays["buf"]] == [[0, 1, 2], [0, 1]]
          and int(restored.state["step"]) == 5
          # Host-local targets come back host-local (replicated only while on disk).
          and isinstance(restored.state["step"].sharding, jax.sharding.SingleDeviceSharding)
          and np.array_equal(jax.random.key_data(restored.state["rng"]),
                             jax.random.key_data(jax.random.key(1))))
    print(f"process {jax.process_index()} checkpoint {'OK' if ok else 'MISMATCH'}", flush=True)
    distributed.sync("multiprocess_checkpoint_prog_done")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
