"""Named model sizes and the analytic parameter count (PAPER §4 table).

`tiny` keeps every test fast (< 1M params); `small` is a real MoE for CPU experiments
(groups, top-k > 1, shared expert); the three Ling 2.0 sizes match the published shapes.
"""
from __future__ import annotations

import dataclasses

from ring_jax.model.config import ModelConfig

_LING_COMMON = dict(vocab_size=157184, head_dim=128, first_k_dense_replace=1, num_experts=256,
                    num_experts_per_tok=8, num_shared_experts=1, n_group=8, topk_group=4,
                    routed_scaling_factor=2.5, use_qk_norm=True, partial_rotary_factor=0.5,
                    rope_theta=600000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
                    param_dtype="bfloat16", dtype="bfloat16", moe_impl="ragged")

PRESETS: dict[str, ModelConfig] = {
    # Byte/char tokenizer vocab (256 bytes + specials) fits in 512.
    "tiny": ModelConfig(vocab_size=512, num_layers=2, hidden_size=64, num_heads=4,
                        num_kv_heads=2, head_dim=16, intermediate_size=128,
                        first_k_dense_replace=1, num_experts=8, num_experts_per_tok=2,
                        num_shared_experts=1, moe_intermediate_size=32, n_group=2,
                        topk_group=1, max_position_embeddings=2048),
    "small": ModelConfig(vocab_size=512, num_layers=6, hidden_size=256, num_heads=8,
                         num_kv_heads=2, head_dim=32, intermediate_size=1024,
                         first_k_dense_replace=1, num_experts=32, num_experts_per_tok=4,
                         num_shared_experts=1, moe_intermediate_size=256, n_group=4,
                         topk_group=2, max_position_embeddings=4096),
    "ling_mini_2": ModelConfig(num_layers=20, hidden_size=2048, num_heads=16, num_kv_heads=4,
                               intermediate_size=5120, moe_intermediate_size=512,
                               **_LING_COMMON),
    "ling_flash_2": ModelConfig(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=4,
                                intermediate_size=9216, moe_intermediate_size=1024,
                                **_LING_COMMON),
    "ling_1t": ModelConfig(num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8,
                           intermediate_size=18432, moe_intermediate_size=2048,
                           **_LING_COMMON),
}


def get(name: str, **overrides) -> ModelConfig:
    """A preset by name, optionally with fields replaced (validated again)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def _attention_params(cfg: ModelConfig) -> int:
    D, H, N, Q = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qk_norm = 2 * Q if cfg.use_qk_norm else 0
    return D * H * Q + 2 * D * N * Q + H * Q * D + qk_norm


def _layer_params(cfg: ModelConfig, moe: bool) -> tuple[int, int]:
    """(total, active) parameters of one block."""
    D = cfg.hidden_size
    common = _attention_params(cfg) + 2 * D  # attention + its two RMSNorms
    if not moe:
        mlp = 3 * D * cfg.intermediate_size
        return common + mlp, common + mlp
    expert = 3 * D * cfg.moe_intermediate_size
    shared = cfg.num_shared_experts * expert
    router = D * cfg.num_experts
    total = common + router + shared + cfg.num_experts * expert
    active = common + router + shared + cfg.num_experts_per_tok * expert
    return total, active


def param_count(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active-per-token) trainable parameters, from the config alone.

    Active counts the embedding and LM head, attention, dense MLPs, router, shared experts and
    the K routed experts a token uses (the expert bias is not a parameter). MTP layers count in
    both.
    """
    D, V = cfg.hidden_size, cfg.vocab_size
    total = active = 2 * V * D + D  # embedding + untied head + final norm
    for layer in range(cfg.num_layers):
        t, a = _layer_params(cfg, cfg.is_moe_layer(layer))
        total, active = total + t, active + a
    for _ in range(cfg.num_mtp_layers):
        t, a = _layer_params(cfg, cfg.is_moe)
        mtp_extra = 2 * D * D + 3 * D  # projection + hidden/embed/final norms
        total, active = total + t + mtp_extra, active + a + mtp_extra
    return total, active
