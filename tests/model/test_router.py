"""Router (PAPER §4): group-limited top-k with the selection-only bias, combine weights, and the
aux-loss-free bias update, on hand-computed cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ring_jax.model import ModelConfig, update_expert_bias
from ring_jax.model import router as router_lib


def _cfg(**kw):
    base = dict(num_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                routed_scaling_factor=2.5)
    base.update(kw)
    return ModelConfig(**base)


def _logits_for(scores):
    s = np.asarray(scores, np.float64)
    return jnp.asarray(np.log(s / (1 - s)), jnp.float32)[None]  # inverse sigmoid


def test_group_limited_topk_by_hand():
    # Groups of 2 experts; group score = sum of its top-2: g0 1.0, g1 1.0, g2 0.85, g3 0.6,
    # so g0 and g1 stay. The plain top-2 would be experts {0, 4} (4 is in the dropped g2).
    scores = [0.9, 0.1, 0.5, 0.5, 0.8, 0.05, 0.3, 0.3]
    ids = router_lib.select_experts(jax.nn.sigmoid(_logits_for(scores)), jnp.zeros(8), _cfg())
    chosen = set(np.asarray(ids)[0].tolist())
    assert 0 in chosen and 4 not in chosen and len(chosen & {2, 3}) == 1


def test_bias_steers_selection_but_not_weights():
    scores = [0.9, 0.1, 0.5, 0.5, 0.8, 0.05, 0.3, 0.3]
    cfg = _cfg(n_group=1, topk_group=1)
    logits = _logits_for(scores)
    plain = router_lib.route(logits, jnp.zeros(8), cfg)
    assert sorted(np.asarray(plain.ids_XK)[0].tolist()) == [0, 4]
    np.testing.assert_allclose(np.asarray(plain.weights_XK)[0],
                               2.5 * np.array([0.9, 0.8]) / 1.7, rtol=1e-5)
    bias = jnp.zeros(8).at[6].set(1.0)  # expert 6 now wins selection...
    biased = router_lib.route(logits, bias, cfg)
    ids = np.asarray(biased.ids_XK)[0]
    assert sorted(ids.tolist()) == [0, 6]
    # ...but its weight is its unbiased score 0.3 (a bug using s + b would give 1.3).
    w = dict(zip(ids.tolist(), np.asarray(biased.weights_XK)[0].tolist()))
    np.testing.assert_allclose([w[0], w[6]], 2.5 * np.array([0.9, 0.3]) / 1.2, rtol=1e-5)


def test_forced_ids_use_router_weights():
    cfg = _cfg()
    logits = jax.random.normal(jax.random.key(0), (5, 8))
    forced = jnp.asarray([[1, 7]] * 5, jnp.int32)
    out = router_lib.route(logits, jnp.zeros(8), cfg, forced)
    s = jax.nn.sigmoid(logits)[:, jnp.array([1, 7])]
    np.testing.assert_array_equal(np.asarray(out.ids_XK), np.asarray(forced))
    np.testing.assert_allclose(np.asarray(out.weights_XK),
                               np.asarray(2.5 * s / s.sum(-1, keepdims=True)), rtol=1e-5)


def test_weights_sum_to_scaling_factor_and_ids_unique():
    cfg = _cfg()
    out = router_lib.route(jax.random.normal(jax.random.key(1), (64, 8)) * 3, jnp.zeros(8), cfg)
    np.testing.assert_allclose(np.asarray(out.weights_XK.sum(-1)), 2.5, rtol=1e-5)
    ids = np.asarray(out.ids_XK)
    assert all(len(set(r)) == 2 for r in ids.tolist())
    # Both experts lie in at most topk_group=2 groups.
    assert all(len({i // 2 for i in r}) <= 2 for r in ids.tolist())


def test_update_expert_bias_by_hand():
    bias = jnp.zeros((1, 4))
    load = jnp.asarray([[10.0, 2.0, 4.0, 4.0]])  # mean 5: offsets -5, 3, 1, 1 -> signs -1,1,1,1
    new = update_expert_bias(bias, load, 1e-3)
    # mean sign 0.5: the overloaded expert goes down by 1.5u, the others up by 0.5u.
    np.testing.assert_allclose(np.asarray(new), [[-1.5e-3, 0.5e-3, 0.5e-3, 0.5e-3]], rtol=1e-6)
    # Perfectly balanced loads leave the bias unchanged.
    same = update_expert_bias(new, jnp.full((1, 4), 3.0), 1e-3)
    np.testing.assert_allclose(np.asarray(same), np.asarray(new))


def test_balance_loss_and_load_by_hand():
    ids = jnp.asarray([[0, 1], [0, 1], [2, 3]], jnp.int32)
    valid = jnp.asarray([True, True, False])
    np.testing.assert_allclose(np.asarray(router_lib.expert_load(ids, valid, 4)), [2, 2, 0, 0])
    scores = jnp.asarray([[[0.5, 0.5, 0.0, 0.0]] * 2], jnp.float32)
    loss = router_lib.sequence_balance_loss(scores, ids[None, :2], jnp.ones((1, 2), bool), 2)
    # f = 4/(2*2)*[2,2,0,0] = [2,2,0,0]; P = [.5,.5,0,0] -> 2.0
    assert float(loss) == pytest.approx(2.0)


_CFG = _cfg(num_experts=12, n_group=4, topk_group=2, num_experts_per_tok=3)
_route = jax.jit(lambda logits, bias: router_lib.route(logits, bias, _CFG))


def _numpy_route(logits, bias, cfg):
    """Plain numpy restatement of PAPER §4's group-limited routing, one token at a time."""
    scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
    ids, weights = [], []
    for s in scores:
        biased = s + bias
        groups = biased.reshape(cfg.n_group, -1)
        group_score = np.sort(groups, axis=1)[:, -2:].sum(1)
        kept = np.argsort(-group_score)[:cfg.topk_group]
        eligible = [e for e in range(len(s)) if e // groups.shape[1] in kept]
        top = sorted(eligible, key=lambda e: -biased[e])[:cfg.num_experts_per_tok]
        ids.append(sorted(top))
        w = s[top] / s[top].sum() * cfg.routed_scaling_factor
        weights.append(w[np.argsort(top)])
    return np.array(ids), np.array(weights)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_route_matches_numpy_restatement(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (16, 12)).astype(np.float32)
    bias = rng.uniform(-0.3, 0.3, 12).astype(np.float32)
    out = _route(jnp.asarray(logits), jnp.asarray(bias))
    ids, weights = np.asarray(out.ids_XK), np.asarray(out.weights_XK)
    order = np.argsort(ids, axis=1)
    ref_ids, ref_weights = _numpy_route(logits, bias, _CFG)
    np.testing.assert_array_equal(np.take_along_axis(ids, order, 1), ref_ids)
    np.testing.assert_allclose(np.take_along_axis(weights, order, 1), ref_weights, rtol=1e-5)
