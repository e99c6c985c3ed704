"""Dense building blocks of the Ling 2.0 transformer (PAPER §4): RMSNorm, partial RoPE (with
optional YaRN), GQA attention with QK-norm and a KV cache, SwiGLU MLP.

Every parameter carries logical axis names (see `ring_jax.sharding.LOGICAL_RULES`); activations
are constrained with logical names too, so one rules table decides the layout.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ring_jax.model.config import ModelConfig

# A finite "minus infinity" so that a fully masked row (padding queries in decode) yields a
# finite, ignorable output instead of NaNs that would poison gradients.
MASK_VALUE = -1e30


def make_param(module: nn.Module, name: str, shape: Sequence[int], axes: tuple[str | None, ...],
               dtype: Any, init: Any) -> jax.Array:
    """A parameter with logical axis names (read back by `sharding.param_logical_axes`)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), dtype)


def normal_init(cfg: ModelConfig):
    return nn.initializers.normal(stddev=cfg.initializer_range)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Logical sharding constraint; a no-op outside a mesh + rules context."""
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · w, normalised in float32 (as the HF reference does)."""

    eps: float
    param_dtype: Any
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale_D = make_param(self, "scale", (x.shape[-1],), ("norm",), self.param_dtype,
                             nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF casts back to the input dtype before the weight multiply; same here.
        return (scale_D.astype(self.dtype) * x32.astype(self.dtype)).astype(self.dtype)


def rope_frequencies(cfg: ModelConfig) -> tuple[jax.Array, float]:
    """Inverse frequencies [rotary_dim/2] and the attention (m)scale; YaRN when
    rope_scaling_factor > 1 (interpolate low frequencies, keep high ones, ramp between)."""
    dim = cfg.rotary_dim
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    factor = cfg.rope_scaling_factor
    if factor == 1.0:
        return inv_freq, 1.0

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(cfg.rope_original_max_position / (num_rotations * 2 * math.pi))
                ) / (2 * math.log(cfg.rope_theta))

    low = max(math.floor(correction_dim(cfg.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    extrapolation_weight = 1.0 - ramp
    inv_freq = (inv_freq / factor) * (1.0 - extrapolation_weight) + inv_freq * extrapolation_weight
    return inv_freq, 0.1 * math.log(factor) + 1.0


def rope_cos_sin(cfg: ModelConfig, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, rotary_dim] in float32, rotate-half layout (frequencies repeated twice)."""
    inv_freq, mscale = rope_frequencies(cfg)
    angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * mscale, jnp.sin(angles) * mscale


def apply_rope(x_BTHQ: jax.Array, cos_BTR: jax.Array, sin_BTR: jax.Array) -> jax.Array:
    """Rotates the first R dims of each head (rotate-half convention); the rest pass through."""
    rot = cos_BTR.shape[-1]
    x_rot, x_pass = x_BTHQ[..., :rot], x_BTHQ[..., rot:]
    x1, x2 = jnp.split(x_rot.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
    x_rot = x_rot.astype(jnp.float32) * cos + rotated * sin
    return jnp.concatenate([x_rot.astype(x_BTHQ.dtype), x_pass], axis=-1)


class Attention(nn.Module):
    """GQA self-attention with per-head QK RMSNorm before partial RoPE (PAPER §4).

    Without a cache, keys are this call's tokens and `mask_BTS` is [B, T, T]. With a cache
    (a dict with k/v [B, N, S, Q], `cache_shape`), every token first writes its k/v into slot
    `positions_BT[b, t]` (negative positions write nothing), then the queries attend over all
    S slots under `mask_BTS` [B, T, S].
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, cos_BTR, sin_BTR, mask_BTS, positions_BT=None, cache=None):
        cfg = self.cfg
        dt, pdt = cfg.compute_jnp_dtype, cfg.param_jnp_dtype
        D, H, N, Q = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = normal_init(cfg)
        w_q_DHQ = make_param(self, "q", (D, H, Q), ("embed", "heads", "head_dim"), pdt, init)
        w_k_DNQ = make_param(self, "k", (D, N, Q), ("embed", "kv_heads", "head_dim"), pdt, init)
        w_v_DNQ = make_param(self, "v", (D, N, Q), ("embed", "kv_heads", "head_dim"), pdt, init)
        w_o_HQD = make_param(self, "o", (H, Q, D), ("heads", "head_dim", "embed"), pdt, init)

        x_BTD = x_BTD.astype(dt)
        q_BTHQ = jnp.einsum("btd,dhq->bthq", x_BTD, w_q_DHQ.astype(dt))
        k_BTNQ = jnp.einsum("btd,dnq->btnq", x_BTD, w_k_DNQ.astype(dt))
        v_BTNQ = jnp.einsum("btd,dnq->btnq", x_BTD, w_v_DNQ.astype(dt))
        if cfg.use_qk_norm:
            norm = dict(eps=cfg.rms_norm_eps, param_dtype=pdt, dtype=dt)
            q_BTHQ = RMSNorm(**norm, name="q_norm")(q_BTHQ)
            k_BTNQ = RMSNorm(**norm, name="k_norm")(k_BTNQ)
        q_BTHQ = apply_rope(q_BTHQ, cos_BTR, sin_BTR)
        k_BTNQ = apply_rope(k_BTNQ, cos_BTR, sin_BTR)
        q_BTHQ = constrain(q_BTHQ, ("act_batch", "act_len", "act_heads", None))

        new_cache = None
        if cache is None:
            k_BNSQ, v_BNSQ = k_BTNQ.swapaxes(1, 2), v_BTNQ.swapaxes(1, 2)
        else:
            k_BNSQ, v_BNSQ, new_cache = write_cache(cache, k_BTNQ, v_BTNQ, positions_BT)
            k_BNSQ, v_BNSQ = k_BNSQ.astype(dt), v_BNSQ.astype(dt)

        B, T = q_BTHQ.shape[:2]
        q_BTNGQ = q_BTHQ.reshape(B, T, N, H // N, Q)
        if 0 < cfg.attention_chunk < T:
            out_BTNGQ = attend_chunked(q_BTNGQ, k_BNSQ, v_BNSQ, mask_BTS, cfg.attention_chunk)
        else:
            out_BTNGQ = attend(q_BTNGQ, k_BNSQ, v_BNSQ, mask_BTS)
        out_BTD = jnp.einsum("bthq,hqd->btd", out_BTNGQ.reshape(B, T, H, Q), w_o_HQD.astype(dt))
        return out_BTD, new_cache


def attend(q_BTNGQ: jax.Array, k_BNSQ: jax.Array, v_BNSQ: jax.Array,
           mask_BTS: jax.Array) -> jax.Array:
    """softmax(q·kᵀ / √Q, masked) · v with float32 scores [B, N, G, T, S]; out in v's dtype.

    k and v are [B, N, S, Q], the KV cache's layout (`CACHE_LOGICAL_AXES`), and each dot is
    written with its operands in the order XLA's canonical dot reads them (batch dims major,
    then free, then contracted for the left operand; batch, contracted, free for the right):
    k as the left operand of the score dot and v as the right operand of the output dot, so
    neither whole cache is transposed before its dot; only the small q and probs are.
    """
    Q = q_BTNGQ.shape[-1]
    scores_BNSGT = jnp.einsum("bnsq,btngq->bnsgt", k_BNSQ, q_BTNGQ,
                              preferred_element_type=jnp.float32) / math.sqrt(Q)
    scores_BNGTS = scores_BNSGT.transpose(0, 1, 3, 4, 2)
    scores_BNGTS = jnp.where(mask_BTS[:, None, None], scores_BNGTS, MASK_VALUE)
    probs_BNGTS = jax.nn.softmax(scores_BNGTS, axis=-1).astype(v_BNSQ.dtype)
    return jnp.einsum("bngts,bnsq->btngq", probs_BNGTS, v_BNSQ)


def attend_chunked(q_BTNGQ: jax.Array, k_BNSQ: jax.Array, v_BNSQ: jax.Array,
                   mask_BTS: jax.Array, chunk: int) -> jax.Array:
    """`attend`, ``chunk`` queries at a time: float32 scores exist for [chunk, S] only, in the
    forward and (each chunk rematerialised) in the backward pass. Every query row's softmax is
    the same computation as in `attend`, so the result is the same up to float summation order.
    """
    B, T = q_BTNGQ.shape[:2]
    num_chunks = -(-T // chunk)
    pad = num_chunks * chunk - T  # padded query rows see no key; their output is dropped
    q_CBcNGQ = jnp.pad(q_BTNGQ, ((0, 0), (0, pad)) + ((0, 0),) * 3).reshape(
        B, num_chunks, chunk, *q_BTNGQ.shape[2:]).swapaxes(0, 1)
    mask_CBcS = jnp.pad(mask_BTS, ((0, 0), (0, pad), (0, 0))).reshape(
        B, num_chunks, chunk, -1).swapaxes(0, 1)
    body = jax.checkpoint(lambda qm: attend(qm[0], k_BNSQ, v_BNSQ, qm[1]))
    out_CBcNGQ = jax.lax.map(body, (q_CBcNGQ, mask_CBcS))
    return out_CBcNGQ.swapaxes(0, 1).reshape(B, num_chunks * chunk,
                                             *q_BTNGQ.shape[2:])[:, :T]


def write_cache(cache: dict[str, jax.Array], k_BTNQ: jax.Array, v_BTNQ: jax.Array,
                positions_BT: jax.Array):
    """Scatters this call's k/v into slots `positions_BT` of each row of the [B, N, S, Q]
    cache; negative positions are padding and are sent out of range so `mode="drop"` writes
    nothing."""
    S = cache["k"].shape[CACHE_LEN_AXIS]
    slot_BT = jnp.where(positions_BT < 0, S, positions_BT)
    row_BT = jnp.broadcast_to(jnp.arange(slot_BT.shape[0])[:, None], slot_BT.shape)
    # Advanced indices split by a slice: the indexed dims (b, t) lead the update, [B, T, N, Q].
    k_BNSQ = cache["k"].at[row_BT, :, slot_BT].set(k_BTNQ.astype(cache["k"].dtype), mode="drop")
    v_BNSQ = cache["v"].at[row_BT, :, slot_BT].set(v_BTNQ.astype(cache["v"].dtype), mode="drop")
    k_BNSQ = constrain(k_BNSQ, CACHE_LOGICAL_AXES)
    v_BNSQ = constrain(v_BNSQ, CACHE_LOGICAL_AXES)
    return k_BNSQ, v_BNSQ, {"k": k_BNSQ, "v": v_BNSQ}


def cache_shape(batch_size: int, max_len: int, num_kv_heads: int, head_dim: int):
    """Shape of each cache array: [B, N, S, Q], the layout `attend`'s dots read without a
    transpose (a [B, S, N, Q] cache was copied whole into that layout after every write)."""
    return (batch_size, num_kv_heads, max_len, head_dim)


# Logical axes of each cache array [B, N, S, Q]; the slot (sequence) axis is CACHE_LEN_AXIS.
CACHE_LOGICAL_AXES = ("act_batch", "act_kv_heads", "cache_len", None)
CACHE_LEN_AXIS = 2


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(x·W_gate) ⊙ x·W_up)."""

    cfg: ModelConfig
    intermediate_size: int

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.cfg
        dt, pdt = cfg.compute_jnp_dtype, cfg.param_jnp_dtype
        D, F = cfg.hidden_size, self.intermediate_size
        init = normal_init(cfg)
        w_gate_DF = make_param(self, "gate", (D, F), ("embed", "mlp"), pdt, init)
        w_up_DF = make_param(self, "up", (D, F), ("embed", "mlp"), pdt, init)
        w_down_FD = make_param(self, "down", (F, D), ("mlp", "embed"), pdt, init)
        x_BTD = x_BTD.astype(dt)
        h_BTF = jax.nn.silu(x_BTD @ w_gate_DF.astype(dt)) * (x_BTD @ w_up_DF.astype(dt))
        h_BTF = constrain(h_BTF, ("act_batch", "act_len", "act_mlp"))
        return h_BTF @ w_down_FD.astype(dt)
