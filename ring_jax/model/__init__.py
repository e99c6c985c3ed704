"""Ling-2.0 MoE transformer (Flax linen): config, presets, layers, MoE dispatch, KV cache, HF I/O.


    from ring_jax.model import ModelConfig, presets, Transformer, init_cache
    cfg = presets.get("tiny")
    variables = Transformer(cfg).init(rng, tokens_BT)   # {'params': ..., 'router': ...}
    logits_BTV, aux = Transformer(cfg).apply(variables, tokens_BT)
"""
from ring_jax.model import hf, presets
from ring_jax.model.config import ModelConfig
from ring_jax.model.router import update_expert_bias
from ring_jax.model.transformer import Transformer, cache_logical_axes, init_cache

__all__ = ["ModelConfig", "presets", "hf", "Transformer", "init_cache", "cache_logical_axes",
           "update_expert_bias"]
