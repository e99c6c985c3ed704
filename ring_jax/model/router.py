"""The Ling 2.0 router (PAPER §4) as pure functions: scores, group-limited top-k selection with
the expert bias, combine weights, router statistics and the aux-loss-free bias update.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ring_jax.model.config import ModelConfig


class Routing(NamedTuple):
    ids_XK: jax.Array  # int32 chosen experts
    weights_XK: jax.Array  # float32 combine weights (unbiased scores, normalised, × scaling)
    scores_XE: jax.Array  # float32 sigmoid (or softmax) scores


def router_scores(logits_XE: jax.Array, cfg: ModelConfig) -> jax.Array:
    logits_XE = logits_XE.astype(jnp.float32)
    if cfg.score_function == "sigmoid":
        return jax.nn.sigmoid(logits_XE)
    return jax.nn.softmax(logits_XE, axis=-1)


def select_experts(scores_XE: jax.Array, bias_E: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Group-limited top-k on the biased scores s + b (the bias steers selection only).

    Experts are split into `n_group` contiguous groups; a group's score is the sum of its top-2
    biased scores; only the best `topk_group` groups stay eligible.
    """
    X, E = scores_XE.shape
    biased_XE = scores_XE + bias_E.astype(jnp.float32)
    if cfg.n_group > 1:
        per_group = E // cfg.n_group
        grouped_XGE = biased_XE.reshape(X, cfg.n_group, per_group)
        group_score_XG = jax.lax.top_k(grouped_XGE, min(2, per_group))[0].sum(-1)
        _, kept_groups = jax.lax.top_k(group_score_XG, cfg.topk_group)
        keep_XG = jnp.zeros((X, cfg.n_group), bool).at[
            jnp.arange(X)[:, None], kept_groups].set(True)
        keep_XE = jnp.repeat(keep_XG, per_group, axis=1)
        biased_XE = jnp.where(keep_XE, biased_XE, -jnp.inf)
    return jax.lax.top_k(biased_XE, cfg.num_experts_per_tok)[1].astype(jnp.int32)


def route(logits_XE: jax.Array, bias_E: jax.Array, cfg: ModelConfig,
          forced_ids_XK: jax.Array | None = None) -> Routing:
    """Chooses experts (or takes the forced ones: router replay; a forced row of -1s means
    "route normally") and their combine weights.

    Combine weights are always the router's *unbiased* scores of the chosen experts, normalised
    to sum 1 (`norm_topk_prob`) and multiplied by `routed_scaling_factor` (PAPER §4).
    """
    scores_XE = router_scores(logits_XE, cfg)
    ids_XK = select_experts(jax.lax.stop_gradient(scores_XE), bias_E, cfg)
    if forced_ids_XK is not None:
        # Tokens whose forced row holds -1 (not routed by the sampler: prompt, padding) keep
        # the router's own choice.
        forced_XK = forced_ids_XK.astype(jnp.int32)
        ids_XK = jnp.where(jnp.all(forced_XK >= 0, axis=-1, keepdims=True), forced_XK, ids_XK)
    weights_XK = jnp.take_along_axis(scores_XE, ids_XK, axis=-1)
    if cfg.norm_topk_prob:
        weights_XK = weights_XK / (weights_XK.sum(-1, keepdims=True) + 1e-20)
    return Routing(ids_XK, weights_XK * cfg.routed_scaling_factor, scores_XE)


def expert_load(ids_XK: jax.Array, valid_X: jax.Array, num_experts: int) -> jax.Array:
    """Tokens routed to each expert [E] (float32), counting valid tokens only."""
    onehot_XKE = jax.nn.one_hot(ids_XK, num_experts, dtype=jnp.float32)
    return jnp.einsum("xke,x->e", onehot_XKE, valid_X.astype(jnp.float32))


def z_loss(logits_XE: jax.Array, valid_X: jax.Array) -> jax.Array:
    """Router z-loss: mean over valid tokens of logsumexp(logits)² (keeps logits small)."""
    lse_X = jax.nn.logsumexp(logits_XE.astype(jnp.float32), axis=-1)
    valid = valid_X.astype(jnp.float32)
    return jnp.sum(lse_X ** 2 * valid) / jnp.maximum(valid.sum(), 1.0)


def sequence_balance_loss(scores_BTE: jax.Array, ids_BTK: jax.Array, valid_BT: jax.Array,
                          num_experts_per_tok: int) -> jax.Array:
    """Sequence-level balance loss Σ_e f_e·P_e averaged over sequences (DeepSeek-V3 style, the
    optional complement to aux-loss-free balancing): f_e = E/(K·T)·#tokens routed to e,
    P_e = mean over tokens of the normalised scores. Returned unscaled (coefficient is the
    trainer's choice)."""
    E = scores_BTE.shape[-1]
    valid_BT = valid_BT.astype(jnp.float32)
    num_tokens_B = jnp.maximum(valid_BT.sum(-1), 1.0)
    counts_BE = jnp.einsum("btke,bt->be", jax.nn.one_hot(ids_BTK, E, dtype=jnp.float32),
                           valid_BT)
    f_BE = counts_BE * E / (num_experts_per_tok * num_tokens_B[:, None])
    probs_BTE = scores_BTE / (scores_BTE.sum(-1, keepdims=True) + 1e-20)
    p_BE = jnp.einsum("bte,bt->be", probs_BTE, valid_BT) / num_tokens_B[:, None]
    return jnp.mean(jnp.sum(f_BE * p_BE, axis=-1))


def update_expert_bias(bias_LE: jax.Array, load_LE: jax.Array, rate: float) -> jax.Array:
    """Aux-loss-free balancing (PAPER §4), outside the gradient:
    b_e += u·(sign(offset_e) − mean_e sign(offset)), offset_e = mean load − load_e.

    Under-loaded experts (positive offset) get a larger bias, so they are selected more often;
    subtracting the mean sign keeps the biases centred."""
    offset_LE = load_LE.mean(-1, keepdims=True) - load_LE
    sign_LE = jnp.sign(offset_LE)
    return bias_LE + rate * (sign_LE - sign_LE.mean(-1, keepdims=True))
