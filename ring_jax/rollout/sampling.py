"""On-device sampling of the next token for a batch of independent requests.

Each row carries its own sampling parameters and its own PRNG key, derived from the request's
seed and the index of the token being sampled (`token_key`), so a request's tokens depend on
nothing but its own logits, seed and parameters: not on its slot, its neighbours in the batch,
or how often it was paused and resumed (PAPER §2: a response may span several engine calls).

The log-prob recorded for a token is ``log_softmax(raw logits)[token]``: the model's own
distribution before temperature, top-k and top-p reshape it. It is what the trainer recomputes
(log π_train) and what IcePop's ratio k compares against (PAPER §1), so both sides must use the
untempered distribution. (A sampler that reports the tempered/truncated probability would make k
differ from 1 even with identical engines.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so masked logits never produce inf - inf = NaN


def token_key(seed: jax.Array, token_index: jax.Array) -> jax.Array:
    """The key that samples generated token ``token_index`` of a request: fold_in(PRNGKey(seed), i)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), token_index)


def truncate_logits(logits_BV: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
    """Masks (to NEG_INF) tokens outside each row's top-k and top-p (nucleus) sets.

    ``top_k_B == 0`` disables top-k; ``top_p_B == 1`` disables top-p. Top-p keeps the smallest
    prefix of the (top-k truncated) distribution, sorted by probability, whose mass reaches p;
    the most likely token is always kept. Ties at the threshold are kept together.
    """
    V = logits_BV.shape[-1]
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)  # descending
    k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, V), V)
    rank_V = jnp.arange(V)
    sorted_BV = jnp.where(rank_V[None, :] < k_B[:, None], sorted_BV, NEG_INF)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Mass strictly before each sorted token; a token is kept while that mass is < p.
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = (mass_before_BV < top_p_B[:, None]) & (rank_V[None, :] < k_B[:, None])
    num_keep_B = jnp.maximum(jnp.sum(keep_BV, axis=-1), 1)
    threshold_B = jnp.take_along_axis(sorted_BV, (num_keep_B - 1)[:, None], axis=-1)[:, 0]
    return jnp.where(logits_BV >= threshold_B[:, None], logits_BV, NEG_INF)


def sample(logits_BV: jax.Array, key_B: jax.Array, *, temperature_B: jax.Array,
           top_k_B: jax.Array, top_p_B: jax.Array, greedy_B: jax.Array,
           banned_BV: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Samples one token per row; returns (token_B int32, logprob_B float32).

    ``banned_BV`` (bool) removes tokens from the sampling distribution (stop tokens before
    ``min_new_tokens``) without changing the recorded log-prob, which is always the raw
    ``log_softmax(logits)`` of the chosen token (module docstring). Greedy rows take the argmax
    of the (unbanned) raw logits.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    if banned_BV is not None:
        logits_BV = jnp.where(banned_BV, NEG_INF, logits_BV)
    greedy_token_B = jnp.argmax(logits_BV, axis=-1)

    scaled_BV = logits_BV / temperature_B[:, None]
    # The sort behind top-k/top-p is the costly part of a decode step for a large vocabulary:
    # skip it when no row truncates.
    needs_truncation = jnp.any(((top_k_B > 0) | (top_p_B < 1.0)) & ~greedy_B)
    scaled_BV = jax.lax.cond(needs_truncation, truncate_logits, lambda x, k, p: x,
                             scaled_BV, top_k_B, top_p_B)
    sampled_token_B = jax.vmap(jax.random.categorical)(key_B, scaled_BV)

    token_B = jnp.where(greedy_B, greedy_token_B, sampled_token_B).astype(jnp.int32)
    logprob_B = jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]
    return token_B, logprob_B
