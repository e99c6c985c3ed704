"""The logical axes of every parameter (golden file) and the mesh axes the rules table gives
them. If you change a parameter's layout on purpose, regenerate the golden file with
`python tests/model/test_sharding.py` and say why in the commit."""
import json
import pathlib

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from ring_jax import sharding
from ring_jax.model import Transformer, presets

GOLDEN = pathlib.Path(__file__).parent / "golden" / "logical_axes_tiny_mtp.json"


def _flat_axes():
    cfg = presets.get("tiny", num_mtp_layers=1)
    axes = sharding.param_logical_axes(Transformer(cfg), jnp.ones((1, 2), jnp.int32))
    flat = jax.tree_util.tree_flatten_with_path(axes, is_leaf=sharding._is_axes)[0]
    return {jax.tree_util.keystr(path): list(a) for path, a in flat}


def test_logical_axes_match_golden():
    assert _flat_axes() == json.loads(GOLDEN.read_text()), (
        f"parameter logical axes changed; if intended, regenerate {GOLDEN} (see docstring)")


def test_rules_map_expert_weights_and_tokens():
    mesh = AbstractMesh((2, 2, 2, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    rules = sharding.LOGICAL_RULES
    assert sharding.spec_for(("exp", "embed", "expert_mlp"), mesh, rules) == P(
        "expert", "fsdp", "tensor")
    # Non-expert weights are split over fsdp × expert (not replicated over expert).
    assert sharding.spec_for(("embed", "heads", "head_dim"), mesh, rules) == P(
        ("fsdp", "expert"), "tensor", None)
    assert sharding.spec_for(("embed", "router_exp"), mesh, rules) == P(("fsdp", "expert"), None)
    assert sharding.spec_for(("vocab", "embed"), mesh, rules) == P("tensor", ("fsdp", "expert"))
    assert sharding.batch_mesh_axes(mesh, 8, rules) == ("data", "fsdp", "expert")
    # A decode batch of 2 is split over the first batch axis only.
    assert sharding.batch_mesh_axes(mesh, 2, rules) == ("data",)
    # Axes a mesh lacks are dropped from specs.
    small = AbstractMesh((4,), ("expert",), axis_types=(AxisType.Auto,))
    assert sharding.spec_for(("exp", "embed", "expert_mlp"), small, rules) == P(
        "expert", None, None)


def test_optimizer_state_takes_the_params_layout():
    import optax
    from jax.sharding import NamedSharding
    mesh = AbstractMesh((2, 4), ("fsdp", "expert"), axis_types=(AxisType.Auto,) * 2)
    params = {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32),
              "experts": jax.ShapeDtypeStruct((4, 8, 2), jnp.float32)}
    shardings = {"w": NamedSharding(mesh, P(("fsdp", "expert"), None)),
                 "experts": NamedSharding(mesh, P("expert", "fsdp", None))}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    out = sharding.optimizer_state_shardings(tx, params, shardings, mesh)
    adam = out[1][0]
    # Left to XLA, jax.jit(tx.init) replicates μ and ν: a whole optimizer state per device.
    assert adam.mu == shardings and adam.nu == shardings
    assert adam.count.spec == P()


if __name__ == "__main__":
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(_flat_axes().items())]
    GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print("wrote", GOLDEN)
