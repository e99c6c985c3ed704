"""Integrity fingerprints do not depend on how an array is sharded (8 fake CPU devices), and
a corrupted shard is caught after restoring onto another mesh."""
import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from ring_jax.train import checkpoint, integrity


def _meshes():
    auto = (AxisType.Auto,) * 2
    return (jax.make_mesh((2, 4), ("data", "expert"), axis_types=auto),
            jax.make_mesh((4, 2), ("data", "expert"), axis_types=auto))


def test_fingerprint_same_on_any_sharding():
    mesh_a, mesh_b = _meshes()
    w = jax.random.normal(jax.random.key(0), (8, 4, 6))
    single, _ = integrity.summarise_state({"w": w})
    for sharding in (NamedSharding(mesh_a, P("expert")), NamedSharding(mesh_b, P(None, "data")),
                     NamedSharding(mesh_a, P())):
        assert integrity.summarise_state({"w": jax.device_put(w, sharding)})[0] == single


def test_mixed_device_sets_in_one_state_and_damage_caught_after_reshard(tmp_path):
    mesh_a, mesh_b = _meshes()
    w = jax.random.normal(jax.random.key(1), (64, 64))
    state = {"w": jax.device_put(w, NamedSharding(mesh_a, P("data", "expert"))),
             # Committed to one device next to mesh-sharded arrays (one jit cannot take both).
             "step": jax.device_put(jnp.asarray(3), jax.devices()[5])}
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state=state)
        ckpt.save(2, state=state)
        ckpt.wait()
    files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "2" / "state") for f in fs]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    target = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype,
                                        sharding=NamedSharding(mesh_b, P(None, "data"))),
              "step": jnp.asarray(0)}
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        restored = ckpt.restore(target)
    assert restored.step == 1
    assert jnp.array_equal(restored.state["w"], w)
    with pytest.raises(checkpoint.CheckpointMismatchError):
        with checkpoint.Checkpointer(tmp_path) as ckpt:
            ckpt.restore({"w": jnp.zeros((2, 2)), "step": jnp.asarray(0)})
