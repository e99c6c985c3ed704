"""Sampling: raw-logit log-probs, truncation sets, greedy, banned tokens, per-row keys."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ring_jax.rollout import sampling

_sample = jax.jit(sampling.sample)
_truncate = jax.jit(sampling.truncate_logits)


def _rows(B, temperature=1.0, top_k=0, top_p=1.0, greedy=False):
    return dict(temperature_B=jnp.full((B,), temperature, jnp.float32),
                top_k_B=jnp.full((B,), top_k, jnp.int32),
                top_p_B=jnp.full((B,), top_p, jnp.float32),
                greedy_B=jnp.full((B,), greedy, bool))


def _keys(B, seed=0):
    return jax.vmap(sampling.token_key)(jnp.full((B,), seed, jnp.uint32), jnp.arange(B))


def test_truncation_hand_checked():
    # probs ∝ exp([3, 2, 1, 0]) = [.644, .237, .087, .032]
    logits = jnp.array([[0.0, 3.0, 1.0, 2.0]] * 4)
    kept = np.asarray(_truncate(logits, jnp.array([0, 2, 0, 3]),
                                jnp.array([1.0, 1.0, 0.9, 0.5]))) > -1e29
    np.testing.assert_array_equal(kept, [
        [True, True, True, True],  # nothing truncated
        [False, True, False, True],  # top-2: logits 3 and 2
        [False, True, True, True],  # top-p .9: .644 + .237 = .881 < .9, needs a third
        [False, True, False, False],  # top-p .5 within top-3: the first token alone (.644)
    ])  # a bug counting mass *including* the token itself would drop the boundary token


def test_logprob_is_raw_log_softmax_whatever_the_temperature():
    logits = jax.random.normal(jax.random.PRNGKey(1), (6, 50)) * 3
    raw = jax.nn.log_softmax(logits, -1)
    for kw in (dict(temperature=0.3, top_k=5), dict(temperature=2.0, top_p=0.5), {}):
        token, logp = _sample(logits, _keys(6), **_rows(6, **kw))
        np.testing.assert_allclose(logp, raw[jnp.arange(6), token], rtol=1e-6)


def test_greedy_and_top_k_1_are_argmax():
    logits = jax.random.normal(jax.random.PRNGKey(2), (8, 100))
    for kw in (dict(greedy=True, temperature=5.0), dict(top_k=1, temperature=5.0)):
        token, _ = _sample(logits, _keys(8), **_rows(8, **kw))
        np.testing.assert_array_equal(token, jnp.argmax(logits, -1))


def test_banned_tokens_are_never_sampled_but_keep_their_raw_logprob_basis():
    logits = jnp.zeros((64, 4)).at[:, 0].set(5.0)  # token 0 dominates
    banned = jnp.zeros((64, 4), bool).at[:, 0].set(True)
    token, logp = _sample(logits, _keys(64), **_rows(64), banned_BV=banned)
    assert (np.asarray(token) != 0).all()
    np.testing.assert_allclose(logp, jax.nn.log_softmax(logits[0])[1], rtol=1e-6)
    greedy, _ = _sample(logits, _keys(64), **_rows(64, greedy=True), banned_BV=banned)
    assert (np.asarray(greedy) != 0).all()


def test_a_row_does_not_depend_on_its_neighbours():
    logits = jax.random.normal(jax.random.PRNGKey(3), (5, 30))
    keys = _keys(5, seed=7)
    alone = [_sample(logits[i:i + 1], keys[i:i + 1], **_rows(1, top_p=0.9))[0][0]
             for i in range(5)]
    together, _ = _sample(logits, keys, **_rows(5, top_p=0.9))
    np.testing.assert_array_equal(together, alone)


def test_token_key_is_fold_in_of_seed_key():
    np.testing.assert_array_equal(
        sampling.token_key(jnp.uint32(11), 3),
        jax.random.fold_in(jax.random.PRNGKey(11), 3))


def test_sampling_frequencies_follow_the_tempered_distribution():
    logits = jnp.log(jnp.array([0.5, 0.3, 0.2]))
    n = 4000
    keys = jax.vmap(sampling.token_key)(jnp.zeros((n,), jnp.uint32), jnp.arange(n))
    token, _ = _sample(jnp.broadcast_to(logits, (n, 3)), keys, **_rows(n, temperature=0.5))
    expected = np.array([0.5, 0.3, 0.2]) ** 2 / np.sum(np.array([0.5, 0.3, 0.2]) ** 2)
    freq = np.bincount(np.asarray(token), minlength=3) / n
    np.testing.assert_allclose(freq, expected, atol=0.03)  # T=1 would give [.5, .3, .2]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), top_k=st.integers(0, 12),
       top_p=st.floats(0.05, 1.0), temperature=st.floats(0.2, 3.0))
def test_sampled_token_lies_in_the_truncated_set(seed, top_k, top_p, temperature):
    logits = jax.random.normal(jax.random.PRNGKey(seed), (4, 12)) * 2
    token, _ = _sample(logits, _keys(4, seed % 1000), **_rows(4, temperature, top_k, top_p))
    allowed = np.asarray(_truncate(logits / temperature, jnp.full((4,), top_k),
                                   jnp.full((4,), top_p, jnp.float32))) > -1e29
    assert allowed[np.arange(4), np.asarray(token)].all()
    if top_k:
        assert (allowed.sum(-1) <= top_k).all()


@pytest.mark.parametrize("top_p", [1.0, 0.3])
def test_top_p_keeps_ties_together(top_p):
    logits = jnp.array([[1.0, 1.0, 0.0]])
    kept = np.asarray(_truncate(logits, jnp.array([0]), jnp.array([top_p]))) > -1e29
    assert kept[0, :2].all()
