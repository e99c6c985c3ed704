"""ring_jax.rl.logprobs: chunked log-probs/entropy equal the unchunked ones, values and grads."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax.rl import logprobs


def _inputs(rows=2, cols=13, dim=8, vocab=50, seed=0, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(k1, (rows, cols, dim), dtype)
    w = (jax.random.normal(k2, (dim, vocab)) * 0.7).astype(dtype)
    targets = jax.random.randint(k3, (rows, cols), 0, vocab)
    return hidden, w, targets


def _np_reference(hidden, w, targets, temperature):
    z = np.einsum("btd,dv->btv", np.asarray(hidden, np.float64), np.asarray(w, np.float64))
    z = z / temperature
    z = z - z.max(-1, keepdims=True)
    logz = np.log(np.exp(z).sum(-1, keepdims=True))
    logp_all = z - logz
    logp = np.take_along_axis(logp_all, np.asarray(targets)[..., None], -1)[..., 0]
    entropy = -(np.exp(logp_all) * logp_all).sum(-1)
    return logp, entropy


def test_logits_helper_matches_numpy():
    hidden, w, targets = _inputs()
    logits = jnp.einsum("btd,dv->btv", hidden, w)
    logp, entropy = logprobs.logprobs_from_logits(logits, targets, temperature=0.7)
    ref_logp, ref_entropy = _np_reference(hidden, w, targets, 0.7)
    np.testing.assert_allclose(np.asarray(logp), ref_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy), ref_entropy, rtol=1e-5, atol=1e-5)
    assert logprobs.logprobs_from_logits(logits, targets, compute_entropy=False)[1] is None


def _weighted_sum(fn, hidden, w, targets, g_logp, g_ent):
    logp, entropy = fn(hidden, w, targets)
    return jnp.sum(logp * g_logp) + jnp.sum(entropy * g_ent)


def _naive(hidden, w, targets, temperature=1.0):
    logits = jnp.einsum("btd,dv->btv", hidden, w, preferred_element_type=jnp.float32)
    return logprobs.logprobs_from_logits(logits, targets, temperature=temperature)


# vocab_chunk_size 7 -> V=50 is covered by 8 backward slices of 7, the last one overlapping.
@pytest.mark.parametrize("chunk_size,vocab_chunk_size", [(1, 50), (4, 7), (13, 7), (64, 64)])
def test_chunked_equals_unchunked_values_and_gradients(chunk_size, vocab_chunk_size):
    hidden, w, targets = _inputs()
    chunked = functools.partial(logprobs.token_logprobs_and_entropy, chunk_size=chunk_size,
                                vocab_chunk_size=vocab_chunk_size, temperature=0.9)
    naive = functools.partial(_naive, temperature=0.9)
    logp, entropy = jax.jit(chunked)(hidden, w, targets)
    ref_logp, ref_entropy = _np_reference(hidden, w, targets, 0.9)
    np.testing.assert_allclose(np.asarray(logp), ref_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy), ref_entropy, rtol=1e-5, atol=1e-5)
    # Gradients w.r.t. hidden and W under arbitrary cotangents on both outputs.
    g_logp, g_ent = jax.random.normal(jax.random.key(5), (2,) + targets.shape)
    grad = jax.jit(jax.grad(functools.partial(_weighted_sum, chunked), argnums=(0, 1)))
    grad_ref = jax.jit(jax.grad(functools.partial(_weighted_sum, naive), argnums=(0, 1)))
    for got, want in zip(grad(hidden, w, targets, g_logp, g_ent),
                         grad_ref(hidden, w, targets, g_logp, g_ent)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bf16_inputs_accumulate_in_float32_and_entropy_can_be_skipped():
    hidden, w, targets = _inputs(dtype=jnp.bfloat16)
    logp, entropy = logprobs.token_logprobs_and_entropy(hidden, w, targets, chunk_size=5,
                                                        compute_entropy=False)
    assert entropy is None and logp.dtype == jnp.float32
    ref_logp, _ = _np_reference(hidden, w, targets, 1.0)  # from the same bf16 values
    np.testing.assert_allclose(np.asarray(logp), ref_logp, rtol=1e-4, atol=1e-4)
    # Without entropy the gradient is that of the log-probs alone; bf16 backward matmuls.
    def loss(fn, h, w_):
        return jnp.sum(fn(h, w_, targets)[0])
    chunked = functools.partial(logprobs.token_logprobs_and_entropy, chunk_size=5,
                                vocab_chunk_size=10, compute_entropy=False)
    got = jax.grad(functools.partial(loss, chunked), argnums=(0, 1))(hidden, w)
    want = jax.grad(functools.partial(loss, _naive), argnums=(0, 1))(hidden, w)
    for g, r in zip(got, want):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                   rtol=2e-2, atol=2e-2)


def test_chunked_gradient_never_holds_full_logits():
    # The compiled backward's temporary memory scales with the chunk, not with T.
    hidden, w, targets = _inputs(rows=1, cols=512, dim=16, vocab=2048)

    def temp_bytes(fn):
        loss = lambda h, w_: jnp.sum(fn(h, w_, targets)[0]) + jnp.sum(fn(h, w_, targets)[1])
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, w).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full_logits_bytes = 512 * 2048 * 4
    chunked = temp_bytes(functools.partial(logprobs.token_logprobs_and_entropy, chunk_size=32))
    naive = temp_bytes(_naive)
    assert naive >= full_logits_bytes
    # 16 chunks of 32 positions: a few [32, 2048] buffers, under half of one full logits copy.
    assert chunked < full_logits_bytes / 2, (chunked, naive)
    assert 8 * chunked < naive, (chunked, naive)


def test_vmap_over_a_leading_axis_equals_loop():
    hidden, w, targets = _inputs(rows=3)
    fn = functools.partial(logprobs.token_logprobs_and_entropy, chunk_size=4, vocab_chunk_size=10)

    def loss(h, t):  # per-row scalar through the custom VJP
        logp, ent = fn(h[None], w, t[None])
        return jnp.sum(logp) + jnp.sum(ent)

    batched = jax.jit(jax.vmap(jax.value_and_grad(loss)))(hidden, targets)
    for i in range(3):
        value, grad = jax.value_and_grad(loss)(hidden[i], targets[i])
        np.testing.assert_allclose(float(batched[0][i]), float(value), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(batched[1][i]), np.asarray(grad), rtol=1e-5,
                                   atol=1e-6)
