"""Query-chunked attention (`ModelConfig.attention_chunk`) equals whole-sequence attention:
values and gradients, with a ragged last chunk, causal + packed-segment masks, and in the model."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ring_jax.model import Transformer, presets
from ring_jax.model.layers import attend, attend_chunked


def _inputs(B=2, T=10, N=2, G=2, Q=8):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, N, G, Q))
    k = jax.random.normal(kk, (B, N, T, Q))  # keys/values [B, N, S, Q], the cache's layout
    v = jax.random.normal(kv, (B, N, T, Q))
    # Causal within two packed segments per row ([0..5], [6..9]) and a fully masked row
    # pattern at the end of row 1 (padding queries): a chunk boundary falls inside a segment.
    seg = jnp.asarray([[1] * 6 + [2] * 4, [1] * 7 + [0] * 3])
    causal = jnp.tril(jnp.ones((T, T), bool))[None]
    mask = causal & (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    return q, k, v, mask


def test_chunked_equals_full_values_and_gradients():
    q, k, v, mask = _inputs()
    full = jax.jit(attend)(q, k, v, mask)
    chunked_fn = jax.jit(attend_chunked, static_argnums=4)
    for chunk in (1, 3, 4, 10):  # 3, 4: a ragged last chunk (padded rows are dropped)
        np.testing.assert_allclose(chunked_fn(q, k, v, mask, chunk), full, atol=1e-6)

    def loss(fn, q, k, v):
        return (fn(q, k, v, mask) * jnp.cos(jnp.arange(q.shape[-1]))).sum()

    grads = jax.jit(jax.grad(lambda *a: loss(attend, *a), argnums=(0, 1, 2)))(q, k, v)
    chunked = jax.jit(jax.grad(
        lambda *a: loss(lambda q, k, v, m: attend_chunked(q, k, v, m, 4), *a),
        argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(chunked, grads):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_model_with_chunked_attention_gives_the_same_logits():
    cfg = presets.get("tiny")
    tokens_BT = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    variables = jax.jit(Transformer(cfg).init)(jax.random.key(0), tokens_BT)
    logits, _ = jax.jit(Transformer(cfg).apply)(variables, tokens_BT)
    chunked_cfg = dataclasses.replace(cfg, attention_chunk=5)
    chunked, _ = jax.jit(Transformer(chunked_cfg).apply)(variables, tokens_BT)
    np.testing.assert_allclose(chunked, logits, atol=1e-5)
