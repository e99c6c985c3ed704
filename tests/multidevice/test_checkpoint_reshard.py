"""Checkpointer: save on one mesh, restore onto a different mesh shape and shardings."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from ring_jax.train import checkpoint


def test_restore_onto_different_mesh(tmp_path):
    auto = (AxisType.Auto,) * 2
    mesh_a = jax.make_mesh((2, 4), ("data", "expert"), axis_types=auto)
    mesh_b = jax.make_mesh((4, 2), ("data", "expert"), axis_types=auto)
    w_EDF = jnp.arange(8 * 4 * 6, dtype=jnp.float32).reshape(8, 4, 6)
    embed_VD = jnp.arange(16 * 4, dtype=jnp.float32).reshape(16, 4)
    state = {"w_EDF": jax.device_put(w_EDF, NamedSharding(mesh_a, P("expert"))),
             "embed_VD": jax.device_put(embed_VD, NamedSharding(mesh_a, P("data", None))),
             "rng": jax.device_put(jax.random.key(5), NamedSharding(mesh_a, P())),
             "step": jnp.asarray(3)}
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state=state, meta={"v": 1})
        ckpt.wait()
    target = {
        "w_EDF": jax.ShapeDtypeStruct(w_EDF.shape, w_EDF.dtype,
                                      sharding=NamedSharding(mesh_b, P(None, "data", "expert"))),
        "embed_VD": jax.ShapeDtypeStruct(embed_VD.shape, embed_VD.dtype,
                                         sharding=NamedSharding(mesh_b, P())),
        "rng": jax.device_put(jax.random.key(0), NamedSharding(mesh_b, P())),
        "step": jnp.asarray(0),
    }
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        restored = ckpt.restore(target)
    out = restored.state
    assert out["w_EDF"].sharding.mesh.shape == {"data": 4, "expert": 2}
    assert out["w_EDF"].sharding.spec == P(None, "data", "expert")
    assert out["embed_VD"].sharding.spec == P()
    np.testing.assert_array_equal(out["w_EDF"], w_EDF)
    np.testing.assert_array_equal(out["embed_VD"], embed_VD)
    np.testing.assert_array_equal(jax.random.key_data(out["rng"]),
                                  jax.random.key_data(jax.random.key(5)))
    assert int(out["step"]) == 3 and restored.meta == {"v": 1}
