"""Per-token log-probabilities and entropies of the sampled tokens (PAPER §1: log π_train(y_t)).

The policy loss needs, per response token, log π(y_t) = z_{y_t} − logsumexp(z) and (for the
entropy metrics and bonus) H = logsumexp(z) − Σ_v softmax(z)_v z_v, with z = h W / τ. At Ling's
vocabulary (V = 157184) the float32 logits of one 4096-token sequence alone take 2.6 GB, and the
backward pass of a naive implementation holds several such tensors.

`token_logprobs_and_entropy` never materialises [B, T, V]: it scans over chunks of the sequence,
computing [B, chunk, V] logits per step, and wraps each step in `jax.checkpoint` so the
backward pass recomputes one chunk's logits at a time instead of saving all of them. Peak
working memory is O(B · chunk · V) instead of O(B · T · V); the price is one extra logits
matmul in the backward pass. The gradient equals the unchunked one (tests/rl/test_logprobs.py).

Sharding: the scan runs over sequence chunks, so a batch axis sharded over devices stays
sharded (each device scans its own rows), and a vocabulary-sharded W works because the target
logit is picked by compare-and-sum rather than a gather, so every V reduction is an ordinary
sharded reduction.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _logprobs_and_entropy_from_scaled_logits(z_BTV: jax.Array, targets_BT: jax.Array,
                                             compute_entropy: bool
                                             ) -> tuple[jax.Array, jax.Array | None]:
    lse_BT = jax.nn.logsumexp(z_BTV, axis=-1)
    # Target logit by compare-and-sum: exact (one nonzero term), fuses with the logits, and
    # needs no gather across a vocabulary-sharded axis.
    vocab_V = jnp.arange(z_BTV.shape[-1], dtype=targets_BT.dtype)
    target_z_BT = jnp.sum(jnp.where(vocab_V == targets_BT[..., None], z_BTV, 0.0), axis=-1)
    logp_BT = target_z_BT - lse_BT
    if not compute_entropy:
        return logp_BT, None
    probs_BTV = jnp.exp(z_BTV - lse_BT[..., None])
    entropy_BT = lse_BT - jnp.sum(probs_BTV * z_BTV, axis=-1)
    return logp_BT, entropy_BT


def logprobs_from_logits(logits_BTV: jax.Array, targets_BT: jax.Array, *,
                         temperature: float = 1.0, compute_entropy: bool = True
                         ) -> tuple[jax.Array, jax.Array | None]:
    """log softmax(logits / τ)[target] and the entropy of softmax(logits / τ), in float32, for
    logits that already exist (small models, tests). Returns (logp_BT, entropy_BT or None)."""
    z_BTV = logits_BTV.astype(jnp.float32) / temperature
    return _logprobs_and_entropy_from_scaled_logits(z_BTV, targets_BT, compute_entropy)


def token_logprobs_and_entropy(hidden_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array,
                               *, chunk_size: int = 256, temperature: float = 1.0,
                               compute_entropy: bool = True
                               ) -> tuple[jax.Array, jax.Array | None]:
    """Chunked `logprobs_from_logits(hidden_BTD @ w_DV, targets_BT)` (see the module docstring).

    Args:
      hidden_BTD: final hidden states (after the final norm), any float dtype.
      w_DV: the output projection (unembedding); logits are accumulated in float32.
      targets_BT: int token ids whose log-probs are wanted (the next tokens).
      chunk_size: sequence positions per step; working memory ~ B · chunk_size · V · 4 bytes
        times a small constant. T need not be a multiple (the tail chunk is padded).
      temperature: τ of the sampler, so log-probs match the distribution sampled from.
      compute_entropy: also return per-token entropy (else None).

    Returns:
      (logp_BT, entropy_BT or None), float32.
    """
    num_rows, num_cols, _ = hidden_BTD.shape
    chunk = max(1, min(chunk_size, num_cols))
    num_chunks = -(-num_cols // chunk)
    pad = num_chunks * chunk - num_cols
    if pad:
        hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    # [N, B, C, ...]: scan over sequence chunks N; the batch axis keeps its sharding.
    hidden_NBCD = hidden_BTD.reshape(num_rows, num_chunks, chunk, -1).swapaxes(0, 1)
    targets_NBC = targets_BT.reshape(num_rows, num_chunks, chunk).swapaxes(0, 1)

    # Checkpointed: the backward pass saves only this step's inputs and recomputes its logits.
    @jax.checkpoint
    def one_chunk(hidden_BCD, targets_BC, w_DV):
        logits_BCV = jnp.einsum("bcd,dv->bcv", hidden_BCD, w_DV,
                                preferred_element_type=jnp.float32)
        return _logprobs_and_entropy_from_scaled_logits(logits_BCV / temperature, targets_BC,
                                                        compute_entropy)

    def step(carry, xs):
        return carry, one_chunk(xs[0], xs[1], w_DV)

    _, (logp_NBC, entropy_NBC) = jax.lax.scan(step, None, (hidden_NBCD, targets_NBC))

    def unchunk(x_NBC):
        return x_NBC.swapaxes(0, 1).reshape(num_rows, num_chunks * chunk)[:, :num_cols]

    return unchunk(logp_NBC), None if entropy_NBC is None else unchunk(entropy_NBC)
