"""Per-token log-probabilities and entropies of the sampled tokens (PAPER §1: log π_train(y_t)).

The policy loss needs, per response token, log π(y_t) = z_{y_t} − logsumexp(z) and (for the
entropy metrics and bonus) H = logsumexp(z) − Σ_v softmax(z)_v z_v, with z = h W / τ. At Ling's
vocabulary (V = 157184) the float32 logits of one 4096-token sequence alone take 2.6 GB, and the
backward pass of a naive implementation holds several such tensors.

`token_logprobs_and_entropy` never materialises [B, T, V]. Its forward pass scans over
sequence chunks, computing [B, chunk, V] logits per step and keeping only per-token
logsumexp and entropy. Its backward pass (a custom VJP, in the spirit of `jax.checkpoint` but
finer) recomputes the logits one [B, chunk, S] block at a time, looping over sequence chunks
and V slices, and accumulates dW in float32 in place, so it holds neither a chunk's full-V
logits nor a per-chunk [D, V] partial gradient. Working memory is O(B · chunk · V) forward and
O(D · V) float32 (the dW accumulator) + O(B · chunk · S) backward, instead of several
O(B · T · V) tensors; the price is one extra logits matmul in the backward pass. Values and
gradients equal the unchunked ones (tests/rl/test_logprobs.py); figures in
experiments/BENCHMARKS.md ("Chunked log-probs").

Sharding: the loops run over sequence chunks, so a batch axis sharded over devices stays
sharded (each device loops over its own rows). The target logit is picked by compare-and-sum
rather than a gather, so every V reduction is an ordinary sharded reduction; W replicated or
sharded along D or V gives the single-device result (tests/multidevice/test_rl_sharded.py),
though a V-sharded W makes the backward's V slices cross devices.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


def _logprobs_and_entropy_from_scaled_logits(z_BTV: jax.Array, targets_BT: jax.Array,
                                             compute_entropy: bool,
                                             lse_BT: jax.Array | None = None
                                             ) -> tuple[jax.Array, jax.Array | None]:
    if lse_BT is None:
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


class _Static(NamedTuple):
    vocab_slice: int
    temperature: float
    compute_entropy: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(hidden_NBCD, w_DV, targets_NBC, static: _Static):
    return _chunked_fwd(hidden_NBCD, w_DV, targets_NBC, static)[0]


def _chunked_fwd(hidden_NBCD, w_DV, targets_NBC, static: _Static):
    def step(_, xs):
        hidden_BCD, targets_BC = xs
        logits_BCV = jnp.einsum("bcd,dv->bcv", hidden_BCD, w_DV,
                                preferred_element_type=jnp.float32)
        z_BCV = logits_BCV / static.temperature
        lse_BC = jax.nn.logsumexp(z_BCV, axis=-1)
        logp_BC, entropy_BC = _logprobs_and_entropy_from_scaled_logits(
            z_BCV, targets_BC, static.compute_entropy, lse_BT=lse_BC)
        return None, (logp_BC, entropy_BC, lse_BC)

    _, (logp_NBC, entropy_NBC, lse_NBC) = jax.lax.scan(step, None, (hidden_NBCD, targets_NBC))
    outputs = (logp_NBC, entropy_NBC) if static.compute_entropy else (logp_NBC,)
    return outputs, (hidden_NBCD, w_DV, targets_NBC, lse_NBC, entropy_NBC)


def _chunked_bwd(static: _Static, residuals, cotangents):
    """d/dz of logp = onehot − p; of H = −p (z − Σ p z) with Σ p z = lse − H.

    One loop over (sequence chunk, V slice) pairs recomputes a [B, C, S] logits block at a
    time, so neither a [B, C, V] tensor nor a per-chunk [D, V] partial gradient exists: dW is
    accumulated in float32, in place. (One flat loop, because a nested loop makes XLA copy the
    [D, V] carry; and an optimisation barrier on W, because XLA:CPU otherwise hoists a float32
    copy of all of W out of the loop.)"""
    hidden_NBCD, w_DV, targets_NBC, lse_NBC, entropy_NBC = residuals
    g_logp_NBC = cotangents[0]
    if static.compute_entropy:
        g_entropy_NBC = cotangents[1]
    else:
        g_entropy_NBC = entropy_NBC = jnp.zeros_like(lse_NBC)
    mean_z_NBC = lse_NBC - entropy_NBC  # Σ_v p_v z_v per token
    dim, vocab = w_DV.shape
    width = static.vocab_slice
    num_slices = -(-vocab // width)
    compute_dtype = w_DV.dtype

    def step(index, carry):
        dhidden_NBCD, dw_DV = carry
        w_step_DV, index = jax.lax.optimization_barrier((w_DV, index))
        i, nominal_start = index // num_slices, (index % num_slices) * width
        # The last slice is shifted left to end at V; its columns already covered by the
        # previous slice are masked out below, so any V works with a static slice width.
        start = jnp.minimum(nominal_start, vocab - width)
        fresh_S = start + jnp.arange(width) >= nominal_start
        hidden_BCD = hidden_NBCD[i]
        w_DS = jax.lax.dynamic_slice_in_dim(w_step_DV, start, width, axis=1)
        z_BCS = jnp.einsum("bcd,ds->bcs", hidden_BCD, w_DS,
                           preferred_element_type=jnp.float32) / static.temperature
        p_BCS = jnp.exp(z_BCS - lse_NBC[i][..., None])
        onehot_BCS = (start + jnp.arange(width, dtype=targets_NBC.dtype)
                      == targets_NBC[i][..., None])
        dz_BCS = (g_logp_NBC[i][..., None] * (onehot_BCS - p_BCS)
                  - g_entropy_NBC[i][..., None] * p_BCS
                  * (z_BCS - mean_z_NBC[i][..., None]))
        dz_BCS = jnp.where(fresh_S, dz_BCS, 0.0)
        # Backward matmuls in W's dtype with float32 accumulation (usual mixed precision).
        dlogits_BCS = (dz_BCS / static.temperature).astype(compute_dtype)
        dhidden_BCD = jnp.einsum("bcs,ds->bcd", dlogits_BCS, w_DS,
                                 preferred_element_type=jnp.float32)
        dw_DS = jnp.einsum("bcd,bcs->ds", hidden_BCD, dlogits_BCS,
                           preferred_element_type=jnp.float32)
        dhidden_NBCD = jax.lax.dynamic_update_index_in_dim(
            dhidden_NBCD, dhidden_NBCD[i] + dhidden_BCD, i, axis=0)
        dw_DV = jax.lax.dynamic_update_slice_in_dim(
            dw_DV, jax.lax.dynamic_slice_in_dim(dw_DV, start, width, axis=1) + dw_DS,
            start, axis=1)
        return dhidden_NBCD, dw_DV

    init = (jnp.zeros(hidden_NBCD.shape, jnp.float32), jnp.zeros((dim, vocab), jnp.float32))
    dhidden_NBCD, dw_DV = jax.lax.fori_loop(0, hidden_NBCD.shape[0] * num_slices, step, init)
    return dhidden_NBCD.astype(hidden_NBCD.dtype), dw_DV.astype(w_DV.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def token_logprobs_and_entropy(hidden_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array,
                               *, chunk_size: int = 256, vocab_chunk_size: int = 16384,
                               temperature: float = 1.0, compute_entropy: bool = True
                               ) -> tuple[jax.Array, jax.Array | None]:
    """Chunked `logprobs_from_logits(hidden_BTD @ w_DV, targets_BT)` (see the module docstring).

    Args:
      hidden_BTD: final hidden states (after the final norm), any float dtype.
      w_DV: the output projection (unembedding); logits are accumulated in float32.
      targets_BT: int token ids whose log-probs are wanted (the next tokens).
      chunk_size: sequence positions per step; forward working memory ~ a few
        B · chunk_size · V float32 buffers. T need not be a multiple (the tail is padded).
      vocab_chunk_size: V columns per block in the backward pass (V need not be a multiple).
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
    static = _Static(max(1, min(vocab_chunk_size, w_DV.shape[1])), float(temperature),
                     bool(compute_entropy))
    outputs = _chunked(hidden_NBCD, w_DV, targets_NBC, static)

    def unchunk(x_NBC):
        return x_NBC.swapaxes(0, 1).reshape(num_rows, num_chunks * chunk)[:, :num_cols]

    return unchunk(outputs[0]), unchunk(outputs[1]) if compute_entropy else None
