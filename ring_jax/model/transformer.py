"""The Ling 2.0 decoder (PAPER §4): embeddings → L pre-norm blocks (attention + dense or MoE
FFN) → final RMSNorm → untied LM head, plus optional MTP layers, and the KV cache for decode.

One module serves training (full sequence, optional packed segments, router replay) and
inference (prefill and one-token decode with a KV cache, per-row positions).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta

from ring_jax import sharding as sharding_lib
from ring_jax.model.config import ModelConfig
from ring_jax.model.layers import (CACHE_LEN_AXIS, CACHE_LOGICAL_AXES, MLP, Attention, RMSNorm,
                                   cache_shape, constrain, make_param, normal_init,
                                   rope_cos_sin)
from ring_jax.model.moe import MoEBlock

Cache = tuple[dict[str, jax.Array], ...]

# `ModelConfig.remat_policy` -> the `jax.checkpoint` policy of each block (None: save nothing).
_REMAT_POLICIES = {"full": None,
                   "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def block_class(cfg: ModelConfig) -> type[nn.Module]:
    """`Block`, rematerialised per ``cfg.remat_policy`` (same parameters and names)."""
    if cfg.remat_policy == "none":
        return Block
    return nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=True)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype: Any = None) -> Cache:
    """Empty KV cache: one {'k', 'v'} of `cache_shape` [B, N, S, Q] per layer (logical axes
    `CACHE_LOGICAL_AXES`; see `cache_logical_axes`)."""
    dtype = cfg.compute_jnp_dtype if dtype is None else dtype
    shape = cache_shape(batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
    return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                 for _ in range(cfg.num_layers))


def cache_logical_axes(cfg: ModelConfig) -> tuple[dict[str, tuple], ...]:
    """Logical axes of every cache array, same structure as `init_cache`."""
    return tuple({"k": CACHE_LOGICAL_AXES, "v": CACHE_LOGICAL_AXES}
                 for _ in range(cfg.num_layers))


class Block(nn.Module):
    """Pre-norm block: x + Attn(norm(x)), then x + FFN(norm(x)); FFN is MoE past the first
    `first_k_dense_replace` layers."""

    cfg: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x_BTD, cos, sin, mask_BTS, valid_BT, positions_BT, cache, forced_ids):
        cfg = self.cfg
        norm = dict(eps=cfg.rms_norm_eps, param_dtype=cfg.param_jnp_dtype,
                    dtype=cfg.compute_jnp_dtype)
        h_BTD = RMSNorm(**norm, name="attn_norm")(x_BTD)
        attn_BTD, cache = Attention(cfg, name="attn")(h_BTD, cos, sin, mask_BTS, positions_BT,
                                                      cache)
        x_BTD = constrain(x_BTD + attn_BTD, ("act_batch", "act_len", "act_embed"))
        h_BTD = RMSNorm(**norm, name="ffn_norm")(x_BTD)
        stats = None
        if cfg.is_moe_layer(self.layer):
            ffn_BTD, stats = MoEBlock(cfg, name="moe")(h_BTD, valid_BT, forced_ids)
        else:
            ffn_BTD = MLP(cfg, cfg.intermediate_size, name="mlp")(h_BTD)
        x_BTD = constrain(x_BTD + ffn_BTD, ("act_batch", "act_len", "act_embed"))
        return x_BTD, cache, stats


class Transformer(nn.Module):
    """Ling 2.0 MoE language model.

    `init` returns plain arrays: {'params': ..., 'router': {... 'expert_bias' [E] per MoE
    layer}} (logical axes: `ring_jax.sharding.param_logical_axes`).

    `apply(variables, tokens_BT, ...)` returns `(logits_BTV, aux)`, or `(logits_BTV, aux, cache)`
    when a cache is passed. Arguments:
      positions_BT: int32 [B, T], default arange(T). With a cache, token (b, t) writes slot
        positions_BT[b, t] and attends to slots <= it; negative positions are padding.
      segment_ids_BT: int32 [B, T] packed sequences (attend within a segment; 0 = padding,
        excluded from router statistics). Full-sequence mode only.
      forced_expert_ids: int32 [L_moe, B, T, K] router replay: use these experts; combine
        weights still come from the router's unbiased scores.
      return_expert_ids: adds aux['expert_ids'] int32 [L_moe, B, T, K].
      return_hidden: return the final-normed hidden [B, T, D] instead of logits.
    aux: 'moe/load' [L_moe, E] tokens per expert; 'moe/z_loss', 'moe/seq_aux_loss' (means over
    MoE layers); 'moe/dropped_frac' (capacity dispatch overflow); with MTP layers (training
    forward only, skipped with a cache) 'mtp_logits' [num_mtp, B, T, V] (layer j predicts the
    token at t + j + 2), and the MTP blocks (named layers_{L + j}) add their rows to
    'moe/load' after the main layers' (L_moe + num_mtp rows, one per 'router' bias leaf);
    'expert_ids' and forced ids cover the main layers only.
    """

    cfg: ModelConfig

    def init(self, rngs, *args, **kwargs):  # noqa: D102  (unboxed arrays, see class docstring)
        return meta.unbox(super().init(rngs, *args, **kwargs))

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None,
                 forced_expert_ids=None, return_expert_ids=False, return_hidden=False,
                 cache: Cache | None = None):
        cfg = self.cfg
        dt, pdt = cfg.compute_jnp_dtype, cfg.param_jnp_dtype
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if cache is not None and segment_ids_BT is not None:
            raise ValueError("segment_ids_BT is for full-sequence (packed) mode, not with cache")
        valid_BT = positions_BT >= 0
        if segment_ids_BT is not None:
            valid_BT = valid_BT & (segment_ids_BT != 0)
        mask_BTS = self._mask(positions_BT, segment_ids_BT, cache)
        cos, sin = rope_cos_sin(cfg, positions_BT)

        embedding_VD = make_param(self, "embed", (cfg.vocab_size, cfg.hidden_size),
                                  ("vocab", "embed"), pdt, normal_init(cfg))
        x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0).astype(dt)
        x_BTD = constrain(x_BTD, ("act_batch", "act_len", "act_embed"))

        new_cache, layer_stats = [], []
        block = block_class(cfg)
        # Initialisation creates every layer by the loop, so the parameter tree is the same.
        scan = cfg.scan_layers and cache is None and not self.is_initializing()
        looped_layers = cfg.first_k_dense_replace if scan else cfg.num_layers
        for i in range(looped_layers):
            moe_index = i - cfg.first_k_dense_replace
            forced = (forced_expert_ids[moe_index]
                      if forced_expert_ids is not None and cfg.is_moe_layer(i) else None)
            x_BTD, layer_cache, stats = block(cfg, i, name=f"layers_{i}")(
                x_BTD, cos, sin, mask_BTS, valid_BT, positions_BT,
                None if cache is None else cache[i], forced)
            new_cache.append(layer_cache)
            if stats is not None:
                layer_stats.append(stats)
        if scan and looped_layers < cfg.num_layers:
            x_BTD, moe_stats = self._scan_moe_layers(x_BTD, cos, sin, mask_BTS, valid_BT,
                                                     positions_BT, forced_expert_ids)
            layer_stats.extend(moe_stats)

        norm = dict(eps=cfg.rms_norm_eps, param_dtype=pdt, dtype=dt)
        h_BTD = RMSNorm(**norm, name="final_norm")(x_BTD)
        lm_head = LMHead(cfg, name="lm_head")
        mtp_logits, mtp_stats = None, []
        if cfg.num_mtp_layers and cache is None:  # MTP is a training head; decode skips it
            mtp_logits, mtp_stats = self._mtp(x_BTD, tokens_BT, embedding_VD, cos, sin,
                                              mask_BTS, valid_BT, positions_BT, lm_head)
        aux = self._aux(layer_stats, mtp_stats, return_expert_ids)
        if mtp_logits is not None:
            aux["mtp_logits"] = mtp_logits
        out = h_BTD if return_hidden else lm_head(h_BTD)
        if cache is None:
            return out, aux
        return out, aux, tuple(new_cache)

    def _scan_moe_layers(self, x_BTD, cos, sin, mask_BTS, valid_BT, positions_BT,
                         forced_expert_ids):
        """The MoE layers (`first_k_dense_replace` .. L - 1, all alike) as one `lax.scan` over
        their variables stacked along a new leading axis (`ModelConfig.scan_layers`).

        The stored tree keeps one `layers_{i}` entry per layer; each call stacks them (the
        gradient flows back to every layer's own entry) and lays the stack out like one layer
        with the layer axis unsplit. Each step applies an unbound `Block` to its slice, under
        the same `remat_policy` as the loop. Returns the output and one stats dict per layer.
        """
        cfg = self.cfg
        first = cfg.first_k_dense_replace
        names = [f"layers_{i}" for i in range(first, cfg.num_layers)]
        block = Block(cfg, first, parent=None)
        logical_axes = sharding_lib.param_logical_axes(
            block, x_BTD, cos, sin, mask_BTS, valid_BT, positions_BT, None, None)
        stacked_LV = {}
        for collection, per_layer in self.variables.items():
            if names[0] not in per_layer:
                continue
            stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                                   *[per_layer[name] for name in names])
            # (The axes tree holds a tuple where `stacked` holds a leaf.)
            stacked_LV[collection] = jax.tree.map(
                lambda leaf_L, axes: constrain(leaf_L, (None, *axes)),
                stacked, logical_axes[collection])

        def layer(x_BTD, variables_and_forced):
            variables, forced = variables_and_forced
            x_BTD, _, stats = block.apply(variables, x_BTD, cos, sin, mask_BTS, valid_BT,
                                          positions_BT, None, forced)
            return x_BTD, stats

        if cfg.remat_policy != "none":
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat_policy])
        x_BTD, stats_L = jax.lax.scan(layer, x_BTD, (stacked_LV, forced_expert_ids))
        return x_BTD, [jax.tree.map(lambda a: a[j], stats_L) for j in range(len(names))]

    def _mask(self, positions_BT, segment_ids_BT, cache):
        """[B, T, S] attention mask. Full sequence: causal in token order, within a segment.
        Cache: query at position p sees its row's slots s <= p."""
        if cache is not None:
            S = cache[0]["k"].shape[CACHE_LEN_AXIS]
            return jnp.arange(S)[None, None, :] <= positions_BT[:, :, None]
        T = positions_BT.shape[1]
        mask_BTS = jnp.tril(jnp.ones((T, T), bool))[None]
        if segment_ids_BT is not None:
            mask_BTS = mask_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
        return jnp.broadcast_to(mask_BTS, (positions_BT.shape[0], T, T))

    def _aux(self, layer_stats, mtp_stats, return_expert_ids):
        cfg = self.cfg
        expert_ids = [s["expert_ids"] for s in layer_stats]
        layer_stats = layer_stats + mtp_stats
        if not layer_stats:  # dense model
            aux = {"moe/load": jnp.zeros((0, cfg.num_experts), jnp.float32),
                   "moe/z_loss": jnp.zeros((), jnp.float32),
                   "moe/seq_aux_loss": jnp.zeros((), jnp.float32),
                   "moe/dropped_frac": jnp.zeros((), jnp.float32)}
            if return_expert_ids:
                aux["expert_ids"] = jnp.zeros((0,), jnp.int32)
            return aux
        stack = lambda key: jnp.stack([s[key] for s in layer_stats])
        aux = {"moe/load": stack("load"),
               "moe/z_loss": stack("z_loss").mean(),
               "moe/seq_aux_loss": stack("seq_aux_loss").mean(),
               "moe/dropped_frac": stack("dropped").sum() / jnp.maximum(
                   stack("assignments").sum(), 1.0)}
        if return_expert_ids:
            aux["expert_ids"] = jnp.stack(expert_ids)
        return aux

    def _mtp(self, x_BTD, tokens_BT, embedding_VD, cos, sin, mask_BTS, valid_BT, positions_BT,
             lm_head):
        """Multi-token prediction (Ling 2.0 / DeepSeek-V3 MTP): layer j combines the previous
        depth's hidden state with the embedding of token t + j + 1 and predicts t + j + 2,
        through its own block and the shared LM head."""
        cfg = self.cfg
        dt, pdt = cfg.compute_jnp_dtype, cfg.param_jnp_dtype
        norm = dict(eps=cfg.rms_norm_eps, param_dtype=pdt, dtype=dt)
        D = cfg.hidden_size
        logits, stats, h_BTD = [], [], x_BTD
        for j in range(cfg.num_mtp_layers):
            # Token t + j + 1 (the last positions see token 0: their targets are out of range).
            next_BT = jnp.roll(tokens_BT, -(j + 1), axis=1)
            emb_BTD = jnp.take(embedding_VD, next_BT, axis=0).astype(dt)
            h_norm = RMSNorm(**norm, name=f"mtp_{j}_hidden_norm")(h_BTD)
            e_norm = RMSNorm(**norm, name=f"mtp_{j}_embed_norm")(emb_BTD)
            w_proj = make_param(self, f"mtp_{j}_proj", (2 * D, D), ("mlp", "embed"), pdt,
                                normal_init(cfg))
            h_BTD = jnp.concatenate([e_norm, h_norm], axis=-1) @ w_proj.astype(dt)
            # Named like the HF convention (model.layers.{L + j}), so router-bias bookkeeping
            # that orders MoE layers by index sees MTP layers after the main ones.
            layer = cfg.num_layers + j
            h_BTD, _, layer_stats = block_class(cfg)(cfg, layer, name=f"layers_{layer}")(
                h_BTD, cos, sin, mask_BTS, valid_BT, positions_BT, None, None)
            if layer_stats is not None:
                stats.append(layer_stats)
            out = RMSNorm(**norm, name=f"mtp_{j}_final_norm")(h_BTD)
            logits.append(lm_head(out))
        return jnp.stack(logits), stats


class LMHead(nn.Module):
    """Untied output projection: kernel [D, V]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BTD):
        cfg = self.cfg
        kernel_DV = make_param(self, "kernel", (cfg.hidden_size, cfg.vocab_size),
                               ("embed", "vocab"), cfg.param_jnp_dtype, normal_init(cfg))
        logits_BTV = jnp.einsum("btd,dv->btv", h_BTD.astype(cfg.compute_jnp_dtype),
                                kernel_DV.astype(cfg.compute_jnp_dtype))
        return constrain(logits_BTV, ("act_batch", "act_len", "act_vocab"))
