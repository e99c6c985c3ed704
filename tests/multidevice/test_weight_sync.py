"""Weight sync trainer → engine on device, 8 fake CPU devices (`rollout.weight_sync`,
`multihost.engine_mesh`): for each engine placement the engine's weights are bit-for-bit the
inference-precision conversion of the trainer's, in the engine's own layout, with no
device-to-host copy; a synced engine samples exactly (tokens, log-probs) what an engine given
the same weights from the host samples, and stamps the new version on the tokens after a sync.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ring_jax import sharding
from ring_jax.config import ConfigError
from ring_jax.model import Transformer, presets
from ring_jax.rollout import engine as engine_lib
from ring_jax.rollout import precision as precision_lib
from ring_jax.rollout import weight_sync
from ring_jax.rollout.engine import Engine, EngineConfig
from ring_jax.rollout.precision import InferencePrecision
from ring_jax.rollout.types import Request, SamplingParams
from ring_jax.train import multihost
from ring_jax.train.multihost import EngineMeshConfig

CONFIG = EngineConfig(num_slots=8, max_len=32, decode_chunk=4, min_prefill_len=32)
CFG = dataclasses.replace(presets.get("tiny"), moe_impl="ragged")
TOKENS = jnp.zeros((1, 4), jnp.int32)


def _trainer_variables(mesh, seed):
    model = Transformer(CFG)
    with sharding.use_mesh(mesh):
        shardings = sharding.param_shardings(mesh, sharding.param_logical_axes(model, TOKENS))
        return jax.jit(model.init, out_shardings=shardings)(jax.random.key(seed), TOKENS)


@pytest.fixture(scope="module")
def host_variables():
    """Two policy versions' variables on the host (the reference the syncs must reproduce)."""
    return [jax.device_get(jax.jit(Transformer(CFG).init)(jax.random.key(s), TOKENS))
            for s in (0, 1)]


# (training mesh over the first devices, engine placement, device-set relation)
LAYOUTS = {
    # Same mesh: the engine's conversion program reads the trainer's arrays as they are.
    "colocated_same_mesh": (dict(fsdp=8), EngineMeshConfig(layout="global")),
    # Same devices, another mesh: experts move onto the expert axis.
    "colocated_own_mesh": (dict(fsdp=8), EngineMeshConfig(layout="global", data=2, expert=4)),
    # Disjoint devices: the trainer on the first 4, the engine on the last 4.
    "disaggregated": (dict(fsdp=4), EngineMeshConfig(layout="global", placement="disaggregated",
                                                     num_devices=4, expert=4)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_sync_is_the_conversion_bit_for_bit_in_the_engines_layout(name, host_variables):
    train_sizes, engine_cfg = LAYOUTS[name]
    train_mesh = sharding.make_mesh(**train_sizes)
    mesh = multihost.engine_mesh(train_mesh, engine_cfg)
    precision = InferencePrecision("bfloat16")
    engine = Engine.from_model(CFG, host_variables[0], CONFIG, precision, mesh=mesh)
    trainer = _trainer_variables(train_mesh, seed=1)
    with jax.transfer_guard_device_to_host("disallow"):  # no gather through the host
        engine.load_weights(multihost.to_engine(trainer, engine_cfg), version=7)
    assert engine.version == 7
    want = precision_lib.prepare_variables(host_variables[1], precision, 7)
    engine_devices = set(mesh.devices.flat)
    for path, got in jax.tree_util.tree_leaves_with_path(engine.variables):
        w = _at(want, path)
        assert got.dtype == w.dtype and got.shape == w.shape, path
        np.testing.assert_array_equal(np.asarray(got), np.asarray(w), err_msg=str(path))
        assert got.sharding.device_set == engine_devices, path
    w_up = engine.variables["params"]["layers_1"]["moe"]["up"]  # [E, D, F]
    assert w_up.sharding.spec[0] == "expert"  # experts split over the engine's expert axis
    assert w_up.addressable_shards[0].data.shape[0] == CFG.num_experts // mesh.shape["expert"]
    assert w_up.sharding.mesh.devices.shape == mesh.devices.shape


def test_reshard_moves_arrays_onto_another_device_order():
    """A mesh over the same devices in another order (jit wants one device order) and a mesh
    over other devices: `reshard` moves the arrays device to device; an array already in its
    target sharding is not copied."""
    train_mesh = sharding.make_mesh(fsdp=8)
    reversed_mesh = Mesh(np.asarray(jax.devices()[::-1]).reshape(1, 1, 8, 1), sharding.MESH_AXES,
                         axis_types=(AxisType.Auto,) * 4)
    other_mesh = Mesh(np.asarray(jax.devices()[4:]).reshape(1, 1, 4, 1), sharding.MESH_AXES,
                      axis_types=(AxisType.Auto,) * 4)
    x = jax.device_put(np.arange(64.0, dtype=np.float32).reshape(8, 8),
                       NamedSharding(train_mesh, P("fsdp")))
    for mesh in (reversed_mesh, other_mesh):
        target = {"w": NamedSharding(mesh, P("expert"))}
        with jax.transfer_guard_device_to_host("disallow"):
            out = weight_sync.reshard({"w": x}, target)["w"]
        assert out.sharding == target["w"]
        np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    same = weight_sync.reshard({"w": x}, {"w": NamedSharding(train_mesh, P("fsdp"))})["w"]
    assert same is x


@pytest.mark.parametrize("name", ["colocated_own_mesh", "disaggregated"])
def test_converting_in_the_trainers_layout_equals_converting_in_the_engines(name):
    """The sync converts before it moves (`WeightSync`); with every perturbation of the
    conversion on (fp8 expert weights, per-expert scale error, router noise), that is bit for
    bit the conversion run in the engine's layout. A layout-dependent conversion (a reduction
    over a sharded axis, a random draw that depends on the shard) would differ here."""
    train_sizes, engine_cfg = LAYOUTS[name]
    train_mesh = sharding.make_mesh(**train_sizes)
    mesh = multihost.engine_mesh(train_mesh, engine_cfg)
    precision = InferencePrecision("bfloat16", fp8_expert_weights=True,
                                   expert_scale_error_std=0.05, router_noise_std=0.1)
    m = engine_lib.model_functions(CFG, CONFIG, precision, moe_impl="ragged", mesh=mesh)
    trainer = _trainer_variables(train_mesh, seed=2)
    with jax.transfer_guard_device_to_host("disallow"):
        got = weight_sync.WeightSync(m.prepare_weights, m.weight_sharding)(trainer, 5)
    with sharding.use_mesh(mesh):
        want = jax.jit(m.prepare_weights, out_shardings=m.weight_sharding)(
            jax.device_put(trainer, m.weight_sharding), 5)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert g.sharding == w.sharding and g.dtype == w.dtype, path
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=str(path))


def test_host_arrays_and_arrays_off_the_mesh_take_the_one_program(host_variables):
    """Host arrays (a per-host engine's gathered weights) and device arrays not on one named
    mesh (here: all on device 0) are placed by the conversion program in the engine's layout;
    both equal the conversion of the host arrays, in the engine's sharding."""
    mesh = multihost.engine_mesh(sharding.make_mesh(fsdp=8),
                                 EngineMeshConfig(layout="global", data=2, expert=4))
    precision = InferencePrecision("bfloat16", router_noise_std=0.1)
    m = engine_lib.model_functions(CFG, CONFIG, precision, moe_impl="ragged", mesh=mesh)
    sync = weight_sync.WeightSync(m.prepare_weights, m.weight_sharding)
    want = precision_lib.prepare_variables(host_variables[0], precision, 3)
    for variables in (host_variables[0], jax.device_put(host_variables[0], jax.devices()[0])):
        with sharding.use_mesh(mesh):
            got = sync(variables, 3)
        for (path, g), w, s in zip(jax.tree_util.tree_leaves_with_path(got),
                                   jax.tree.leaves(want), jax.tree.leaves(m.weight_sharding)):
            assert g.sharding == s and g.dtype == w.dtype, path
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=str(path))


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_synced_engine_samples_exactly_as_a_host_loaded_one_and_stamps_versions(
        host_variables):
    """One engine (its programs compile once): version 1 loaded from the host samples the
    reference; then another version, then version 1 again through the sync from the trainer's
    layout: the same tokens and bit-identical log-probs, stamped with the new version."""
    train_mesh = sharding.make_mesh(fsdp=8)
    engine_cfg = EngineMeshConfig(layout="global", data=2, expert=4)
    mesh = multihost.engine_mesh(train_mesh, engine_cfg)
    rng = np.random.default_rng(0)
    requests = [Request(f"r{i}", rng.integers(0, 512, size=6).astype(np.int32),
                        SamplingParams(temperature=1.0, max_new_tokens=10), seed=i)
                for i in range(8)]
    engine = Engine.from_model(CFG, host_variables[1], CONFIG, InferencePrecision("float32"),
                               mesh=mesh, version=1)
    engine.add(requests)
    want = {r.request_id: r for r in engine.step().finished}
    engine.load_weights(host_variables[0], version=2)
    engine.load_weights(multihost.to_engine(_trainer_variables(train_mesh, seed=1), engine_cfg),
                        version=3)
    engine.add(requests)
    got = engine.step().finished
    assert sorted(r.request_id for r in got) == sorted(want)
    for r in got:
        np.testing.assert_array_equal(r.tokens, want[r.request_id].tokens)
        np.testing.assert_array_equal(r.logprobs, want[r.request_id].logprobs)  # bitwise
        assert set(r.versions.tolist()) == {3}


def test_engine_mesh_layouts_and_errors():
    train_mesh = sharding.make_mesh(fsdp=4)  # the first 4 devices
    assert multihost.engine_mesh(train_mesh, EngineMeshConfig()) is train_mesh  # one process
    own = multihost.engine_mesh(sharding.make_mesh(fsdp=8),
                                EngineMeshConfig(layout="global", expert=-1, tensor=2))
    assert dict(own.shape) == {"data": 1, "fsdp": 1, "expert": 4, "tensor": 2}
    disaggregated = multihost.engine_mesh(
        train_mesh, EngineMeshConfig(layout="global", placement="disaggregated", num_devices=4))
    assert dict(disaggregated.shape)["data"] == 4
    assert set(disaggregated.devices.flat) == set(jax.devices()[4:])
    with pytest.raises(ConfigError, match="mesh.engine.num_devices=6 is invalid: .*overlap"):
        multihost.engine_mesh(train_mesh, EngineMeshConfig(
            layout="global", placement="disaggregated", num_devices=6))
    with pytest.raises(ConfigError, match="mesh.engine.expert=-1 is invalid"):
        multihost.engine_mesh(sharding.make_mesh(fsdp=8),
                              EngineMeshConfig(layout="global", expert=-1, tensor=3))
