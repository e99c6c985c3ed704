"""ring_jax.rl under an 8-device mesh: sharded [B, T] inputs give the single-device results."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from ring_jax.rl import advantages as adv_lib
from ring_jax.rl import logprobs, losses

MESH_SHAPES = [(2, 4), (4, 2)]  # asymmetric pair catches swapped axes


def _mesh(shape):
    return jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def _put(mesh, x, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))


def _loss_batch(rows=8, cols=16, seed=0):
    rng = np.random.default_rng(seed)
    logp_infer = -rng.exponential(1.0, (rows, cols))
    logp_old = np.minimum(logp_infer + rng.normal(0, 0.6, (rows, cols)), 0.0)
    logp = logp_old + rng.normal(0, 0.3, (rows, cols))
    lengths = rng.integers(1, cols + 1, rows)
    mask = (np.arange(cols) < lengths[:, None]).astype(np.float32)
    adv = rng.normal(0, 1, rows)
    entropy = rng.random((rows, cols))
    f = lambda x: np.asarray(x, np.float32)
    return f(logp), f(logp_old), f(logp_infer), f(adv), mask, f(entropy)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _loss_and_grad(logp, logp_old, logp_infer, adv, mask, entropy, cfg):
    def f(lp):
        return losses.policy_loss(lp, logp_old, logp_infer, adv, mask, cfg, entropy_BT=entropy)
    return jax.value_and_grad(f, has_aux=True)(logp)


@pytest.mark.parametrize("shape", MESH_SHAPES)
@pytest.mark.parametrize("correction", ["icepop", "seq_mask"])  # token- and row-level
def test_policy_loss_sharded_equals_single_device(shape, correction):
    mesh = _mesh(shape)
    batch = _loss_batch()
    cfg = losses.LossConfig(correction=correction, kpop_phi=0.3)
    (ref_loss, ref_metrics), ref_grad = _loss_and_grad(*batch, cfg)
    # [B, T] sharded over both axes; advantages [B] over data.
    specs = [P("data", "model")] * 3 + [P("data")] + [P("data", "model")] * 2
    sharded = [_put(mesh, x, s) for x, s in zip(batch, specs)]
    with jax.set_mesh(mesh):
        (loss, metrics), grad = _loss_and_grad(*sharded, cfg)
    assert grad.sharding.spec == P("data", "model")
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-5, atol=1e-8)
    for key in ref_metrics:
        np.testing.assert_allclose(float(metrics[key]), float(ref_metrics[key]), rtol=1e-5,
                                   atol=1e-7, err_msg=key)


def test_advantages_sharded_over_groups():
    mesh = _mesh((8, 1))
    rewards = np.random.default_rng(1).integers(0, 2, (16, 4)).astype(np.float32)
    cfg = adv_lib.AdvantageConfig(drop_degenerate=True, batch_norm="std")
    fn = jax.jit(adv_lib.compute_advantages, static_argnums=1)
    ref = fn(rewards, cfg)
    with jax.set_mesh(mesh):
        out = fn(_put(mesh, rewards, P("data", None)), cfg)
    np.testing.assert_allclose(np.asarray(out.advantages), np.asarray(ref.advantages), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_array_equal(np.asarray(out.keep), np.asarray(ref.keep))
    assert float(out.metrics["rl/degenerate_groups"]) == float(ref.metrics["rl/degenerate_groups"])


@pytest.mark.parametrize("w_spec", [P(None, None), P(None, "model"), P("model", None)])
def test_chunked_logprobs_sharded_equals_single_device(w_spec):
    mesh = _mesh((4, 2))
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(k1, (4, 24, 16))
    w = jax.random.normal(k2, (16, 64)) * 0.5
    targets = jax.random.randint(k3, (4, 24), 0, 64)
    g_logp, g_ent = jax.random.normal(k4, (2, 4, 24))
    fn = functools.partial(logprobs.token_logprobs_and_entropy, chunk_size=8,
                           vocab_chunk_size=16, temperature=0.8)

    @jax.jit
    def run(h, w_, t):
        def f(h, w_):
            logp, ent = fn(h, w_, t)
            return jnp.sum(logp * g_logp) + jnp.sum(ent * g_ent), (logp, ent)
        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, w_)

    (_, ref_out), ref_grads = run(hidden, w, targets)
    with jax.set_mesh(mesh):
        (_, out), grads = run(_put(mesh, hidden, P("data", None, None)), _put(mesh, w, w_spec),
                              _put(mesh, targets, P("data", None)))
    for got, want in zip(list(out) + list(grads), list(ref_out) + list(ref_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
