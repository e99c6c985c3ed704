"""Sharded forward + grad of the tiny model on (data, fsdp, expert, tensor) meshes of 8 fake
CPU devices equal the single-device result, for both fast dispatch paths; parameters land
where the rules table says. Slow-marked meshes complete the issue's list (`-m slow`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax import sharding
from ring_jax.model import Transformer, cache_logical_axes, init_cache, presets
from tests.model.conftest import random_variables

B, T = 8, 12


def _loss_fn(model):
    def loss(params, router, tokens):
        logits, aux = model.apply({"params": params, "router": router}, tokens,
                                  return_expert_ids=True)
        # A loss that touches every logit with a different weight.
        return jnp.mean(jax.nn.logsumexp(logits, -1)) + 1e-2 * jnp.mean(logits[..., :7]), aux
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


_SINGLE = {}


def _single_device(impl):
    """Single-device reference per dispatch path (computed once per module)."""
    if impl not in _SINGLE:
        # capacity_factor 8 makes the capacity path dropless on every mesh (C = local tokens).
        cfg = presets.get("tiny", moe_impl=impl, capacity_factor=8.0)
        model = Transformer(cfg)
        variables = random_variables(cfg, bias_scale=0.05)
        tokens = jax.random.randint(jax.random.key(0), (B, T), 0, cfg.vocab_size)
        (loss, aux), grads = _loss_fn(model)(variables["params"], variables["router"], tokens)
        _SINGLE[impl] = cfg, model, variables, tokens, (loss, aux, grads)
    return _SINGLE[impl]


def _check_mesh(impl, shape, sharded_model=None):
    """The sharded run (of ``sharded_model``, default the same model) equals the single-device
    result of ``impl``."""
    cfg, model, variables, tokens, (loss, aux, grads) = _single_device(impl)
    model = sharded_model or model
    mesh = sharding.make_mesh(*shape)
    with sharding.use_mesh(mesh):
        shardings = sharding.param_shardings(mesh, sharding.param_logical_axes(model, tokens))
        placed = jax.device_put(variables, shardings)
        placed_tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, B))
        (loss_s, aux_s), grads_s = _loss_fn(model)(placed["params"], placed["router"],
                                                   placed_tokens)
    # Parameters sit where the rules put them (experts over `expert`, FFN over `tensor`).
    gate = placed["params"]["layers_1"]["moe"]["gate"]
    assert gate.sharding.spec == sharding.spec_for(("exp", "embed", "expert_mlp"), mesh)
    assert gate.addressable_shards[0].data.shape == (
        cfg.num_experts // shape[2], cfg.hidden_size // shape[1],
        cfg.moe_intermediate_size // shape[3])
    np.testing.assert_allclose(float(loss_s), float(loss), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(aux_s["expert_ids"]), np.asarray(aux["expert_ids"]))
    np.testing.assert_allclose(np.asarray(aux_s["moe/load"]), np.asarray(aux["moe/load"]))
    assert float(aux_s["moe/dropped_frac"]) == 0.0
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        g_s = grads_s
        for key in path:
            g_s = g_s[key.key]
        np.testing.assert_allclose(np.asarray(g_s), np.asarray(g), atol=1e-6, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


ALL_MESHES = [(8, 1, 1, 1), (1, 1, 8, 1), (2, 1, 4, 1), (1, 2, 4, 1), (1, 4, 2, 1),
              (2, 2, 2, 1), (1, 1, 4, 2)]
# Default set (each costs a compile): asymmetric meshes catch swapped axes ((1,2,4) vs
# (1,4,2)), expert parallelism with tensor parallelism, every dispatch path
# (`dropless_capacity`, the engine's default, with expert x tensor).
DEFAULT = [("capacity", (1, 2, 4, 1)), ("ragged", (1, 4, 2, 1)), ("capacity", (1, 1, 4, 2)),
           ("ragged", (2, 1, 4, 1)), ("dropless_capacity", (1, 1, 4, 2))]


@pytest.mark.parametrize("impl, shape", DEFAULT)
def test_sharded_matches_single_device(impl, shape):
    _check_mesh(impl, shape)


@pytest.mark.slow
@pytest.mark.parametrize("impl, shape", [(i, s) for i in ("capacity", "ragged", "dropless_capacity")
                                         for s in ALL_MESHES if (i, s) not in DEFAULT])
def test_sharded_matches_single_device_all_meshes(impl, shape):
    _check_mesh(impl, shape)


@pytest.mark.parametrize("shape", [(1, 2, 4, 1), (1, 1, 4, 2)])
def test_sharded_ragged_token_chunks_match_single_device(shape):
    """`moe_token_chunk=5` under a mesh: each device's 12 (fsdp × expert) or 24 (expert × tensor)
    tokens run in chunks of 5 (the last one padded), each chunk all-gathered over `expert` and
    reduce-scattered back (psum over `tensor` inside the chunk), equal the unchunked
    single-device ragged result. Chunks mismatched between shards would mix tokens."""
    chunked = presets.get("tiny", moe_impl="ragged", capacity_factor=8.0, moe_token_chunk=5)
    _check_mesh("ragged", shape, Transformer(chunked))


def test_sharded_decode_matches_single_device():
    """Prefill + one decode step with the cache split over batch and kv heads."""
    cfg = presets.get("tiny")
    model = Transformer(cfg)
    variables = random_variables(cfg, bias_scale=0.05)
    tokens = jax.random.randint(jax.random.key(1), (B, 6), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (B, 6))

    def run(variables, cache):
        step = jax.jit(lambda v, t, p, c: model.apply(v, t, positions_BT=p, cache=c))
        _, _, cache = step(variables, tokens[:, :5], positions[:, :5], cache)
        logits, _, _ = step(variables, tokens[:, 5:], positions[:, 5:], cache)
        return np.asarray(logits)

    expected = run(variables, init_cache(cfg, B, 8, jnp.float32))
    mesh = sharding.make_mesh(2, 1, 2, 2)
    with sharding.use_mesh(mesh):
        placed = jax.device_put(variables, sharding.param_shardings(
            mesh, sharding.param_logical_axes(model, tokens)))
        cache = jax.device_put(init_cache(cfg, B, 8, jnp.float32), sharding.param_shardings(
            mesh, cache_logical_axes(cfg)))
        got = run(placed, cache)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_sharded_scanned_layers_match_single_device():
    """`scan_layers` under a mesh (with remat and token chunks, the pod recipe): the stacked
    expert weights keep their layout inside the scan, and the result is the loop's."""
    scanned = presets.get("tiny", moe_impl="ragged", capacity_factor=8.0, moe_token_chunk=5,
                          remat_policy="full", scan_layers=True)
    _check_mesh("ragged", (1, 2, 4, 1), Transformer(scanned))
