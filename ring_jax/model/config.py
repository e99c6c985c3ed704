"""`ModelConfig`: the Ling 2.0 architecture's hyper-parameters (PAPER §4), frozen and validated.

Field names follow the HF BailingMoeV2 / Glm4Moe configs where one exists, so `hf.load` maps
them one to one. `num_experts=0` gives a dense model (every layer a SwiGLU MLP), used for the
MoE-vs-dense mismatch ablation.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ring_jax import config as config_lib

DTYPES = ("float32", "bfloat16", "float16")
MOE_IMPLS = ("reference", "capacity", "dropless_capacity", "ragged")
SCORE_FUNCTIONS = ("sigmoid", "softmax")
# What a block keeps for the backward pass (`transformer.REMAT_POLICIES`): "none" keeps every
# activation; "full" only the block's input (the block's forward runs again in the backward);
# "save_dots" the outputs of the matmuls without a batch dimension (the weight matmuls), the
# rest (norms, softmax, SwiGLU, attention scores) is recomputed.
REMAT_POLICIES = ("none", "full", "save_dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Ling 2.0 style MoE transformer.

    Dtypes are names (hashable, JSON-friendly); `param_jnp_dtype` / `compute_jnp_dtype` give the
    jnp types. The router always runs in float32 (PAPER §4: small score differences flip experts).
    """

    vocab_size: int = 512
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128  # dense SwiGLU FFN (the first `first_k_dense_replace` layers)
    first_k_dense_replace: int = 1
    # MoE (PAPER §4): routed experts, active per token, always-on shared experts.
    num_experts: int = 8
    num_experts_per_tok: int = 2
    num_shared_experts: int = 1
    moe_intermediate_size: int = 32
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.5
    score_function: str = "sigmoid"
    norm_topk_prob: bool = True
    # Attention.
    use_qk_norm: bool = True
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    # YaRN context extension; 1.0 disables it.
    rope_scaling_factor: float = 1.0
    rope_original_max_position: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    # Multi-token prediction (Ling 2.0 MTP): extra next-next-token layers, off by default.
    num_mtp_layers: int = 0
    initializer_range: float = 0.02
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of activations and matmuls
    # MoE dispatch implementation and the capacity factor of the capacity-based one.
    moe_impl: str = "capacity"
    capacity_factor: float = 2.0
    min_capacity: int = 16  # small batches (decode) get C = X slots: never dropped
    # Per-block rematerialisation for the training backward pass (memory for FLOPs); the
    # parameters, their names and the forward's numerics do not change.
    remat_policy: str = "none"
    # Attention over this many queries at a time (0: all at once). A chunk's float32 scores are
    # [chunk, keys] instead of [T, T]; same result (`layers.attend_chunked`).
    attention_chunk: int = 0
    # The ragged dispatch over this many local tokens at a time (0: all at once), each chunk
    # rematerialised in the backward pass: its all-gathered, K-times repeated buffers are
    # [P·chunk·K, ·] instead of [P·X·K, ·] (P expert shards, X local tokens). Same result,
    # still dropless (`moe._ragged_chunked`); the other dispatches ignore it.
    moe_token_chunk: int = 0
    # Run the MoE layers of a full-sequence forward (training, log-probs; not the cached
    # decode) as one `lax.scan` over their weights stacked per call, instead of a Python loop:
    # one compiled copy of the block and one placement of its buffers, whatever the depth.
    # Same parameters and result (`Transformer._scan_moe_layers`); costs a stacked copy of
    # the MoE layers' weights (and of their gradients in the backward pass) per forward.
    scan_layers: bool = False

    def __post_init__(self):
        c = config_lib
        c.check_int("vocab_size", self.vocab_size, min_value=1)
        c.check_int("num_layers", self.num_layers, min_value=1)
        c.check_int("hidden_size", self.hidden_size, min_value=1)
        c.check_int("num_heads", self.num_heads, min_value=1)
        c.check_int("num_kv_heads", self.num_kv_heads, min_value=1)
        c.check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", self.num_kv_heads,
                f"must divide num_heads={self.num_heads} (GQA)")
        c.check_int("head_dim", self.head_dim, min_value=2)
        c.check(self.head_dim % 2 == 0, "head_dim", self.head_dim, "must be even (RoPE pairs)")
        c.check_int("intermediate_size", self.intermediate_size, min_value=1)
        c.check_int("first_k_dense_replace", self.first_k_dense_replace, min_value=0,
                    max_value=self.num_layers)
        c.check_int("num_experts", self.num_experts, min_value=0)
        if self.num_experts > 0:
            c.check_int("num_experts_per_tok", self.num_experts_per_tok, min_value=1,
                        max_value=self.num_experts)
            c.check_int("num_shared_experts", self.num_shared_experts, min_value=0)
            c.check_int("moe_intermediate_size", self.moe_intermediate_size, min_value=1)
            c.check_int("n_group", self.n_group, min_value=1)
            c.check(self.num_experts % self.n_group == 0, "n_group", self.n_group,
                    f"must divide num_experts={self.num_experts}")
            c.check_int("topk_group", self.topk_group, min_value=1, max_value=self.n_group)
            kept = self.topk_group * (self.num_experts // self.n_group)
            c.check(self.num_experts_per_tok <= kept, "num_experts_per_tok",
                    self.num_experts_per_tok,
                    f"must be <= the experts in the kept groups (topk_group * num_experts / "
                    f"n_group = {kept})")
            c.check_float("routed_scaling_factor", self.routed_scaling_factor, min_value=0.0,
                          min_exclusive=True)
            c.check_one_of("score_function", self.score_function, SCORE_FUNCTIONS)
            c.check_one_of("moe_impl", self.moe_impl, MOE_IMPLS)
            c.check_float("capacity_factor", self.capacity_factor, min_value=0.0,
                          min_exclusive=True)
            c.check_int("min_capacity", self.min_capacity, min_value=1)
        c.check_float("partial_rotary_factor", self.partial_rotary_factor, min_value=0.0,
                      max_value=1.0, min_exclusive=True)
        c.check(self.rotary_dim % 2 == 0 and self.rotary_dim >= 2, "partial_rotary_factor",
                self.partial_rotary_factor,
                f"must give an even rotary dim >= 2 (head_dim={self.head_dim})")
        c.check_float("rope_theta", self.rope_theta, min_value=1.0, min_exclusive=True)
        c.check_float("rope_scaling_factor", self.rope_scaling_factor, min_value=1.0)
        c.check_int("rope_original_max_position", self.rope_original_max_position, min_value=1)
        c.check_int("max_position_embeddings", self.max_position_embeddings, min_value=1)
        c.check_float("rms_norm_eps", self.rms_norm_eps, min_value=0.0, min_exclusive=True)
        c.check_int("num_mtp_layers", self.num_mtp_layers, min_value=0)
        c.check_float("initializer_range", self.initializer_range, min_value=0.0)
        c.check_one_of("param_dtype", self.param_dtype, DTYPES)
        c.check_one_of("dtype", self.dtype, DTYPES)
        c.check_one_of("remat_policy", self.remat_policy, REMAT_POLICIES)
        c.check_int("attention_chunk", self.attention_chunk, min_value=0)
        c.check_int("moe_token_chunk", self.moe_token_chunk, min_value=0)
        c.check(isinstance(self.scan_layers, bool), "scan_layers", self.scan_layers,
                "must be a bool")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense_replace if self.is_moe else 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer >= self.first_k_dense_replace

    @property
    def rotary_dim(self) -> int:
        # Even number of leading head dims that get RoPE (PAPER §4: the first half).
        return int(self.head_dim * self.partial_rotary_factor) // 2 * 2

    @property
    def param_jnp_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def compute_jnp_dtype(self):
        return jnp.dtype(self.dtype)
