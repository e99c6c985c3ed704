"""The engine's inference precision policy, separate from the trainer's (PAPER §1).

The rollout engine and the trainer share the model code but not its numerics: by default the
engine keeps weights, activations and the KV cache in bfloat16 while the trainer recomputes
log-probs in float32. That gap is the training–inference mismatch IcePop corrects. The policy
can also remove it (``dtype="float32"``, for exact parity checks) or widen it on purpose:
fp8 (e4m3) quantize-dequantized expert weights, as an fp8 serving stack would use, Gaussian
noise on the router logits, which flips near-tied expert choices (the MoE failure mode), and a
systematic per-expert scale error that compounds over training (``expert_scale_error_std``).

Why the scale error compounds and the router noise does not. ``router_noise_std`` adds noise of
a fixed size, redrawn for every policy version and independent of the parameters: its effect on
the trainer's batches averages out over steps and does not grow as the policy changes. The scale
error multiplies expert e's router column and its gate/up/down weights by (1 + σ·ε_e), with ε_e
drawn once per run (``expert_scale_error_seed``), never per version. So (1) it is *systematic*:
the engine samples from the same biased distribution at every step, and an uncorrected trainer
keeps pushing the policy along the bias instead of averaging it away; (2) it is *parameter
dependent*: the error of expert e's router logit is σ·ε_e·(h·W_e), and its output is off by the
same relative amount, so the absolute gap grows with the weights' own magnitude. As training
grows the router logits and the expert weights, the engine–trainer log-prob gap grows with them
(tests/rollout/test_precision.py measures it against the weights' scale), the compounding that
PAPER §1 describes for MoE RL.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
import jax.numpy as jnp

from ring_jax import config as config_lib

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value


@dataclasses.dataclass(frozen=True)
class InferencePrecision:
    """How the engine computes. ``dtype`` covers weights, activations and the KV cache."""

    dtype: str = "bfloat16"
    fp8_expert_weights: bool = False  # quantize-dequantize routed-expert weights to e4m3
    router_noise_std: float = 0.0  # std of Gaussian noise added to router logits (0: off)
    # σ of the fixed per-expert relative scale error on router columns and expert weights (0: off)
    expert_scale_error_std: float = 0.0
    expert_scale_error_seed: int = 0  # draws ε_e; fixed for the run (not per policy version)

    def __post_init__(self):
        config_lib.check_one_of("dtype", self.dtype, DTYPES)
        config_lib.check_float("router_noise_std", self.router_noise_std, min_value=0.0)
        config_lib.check_float("expert_scale_error_std", self.expert_scale_error_std,
                               min_value=0.0, max_value=1.0)
        config_lib.check_int("expert_scale_error_seed", self.expert_scale_error_seed,
                             min_value=0)

    @property
    def has_mismatch_knob(self) -> bool:
        """Whether the engine widens the mismatch on purpose (beyond its dtype)."""
        return (self.fp8_expert_weights or self.router_noise_std > 0
                or self.expert_scale_error_std > 0)

    @property
    def jnp_dtype(self) -> Any:
        return DTYPES[self.dtype]


def fake_quantize_fp8(w: jax.Array, reduce_axis: int) -> jax.Array:
    """Round-trips ``w`` through float8 e4m3 with one scale per output channel.

    The scale maps each channel's absolute maximum (over ``reduce_axis``, the contraction axis)
    to e4m3's largest finite value, as per-channel fp8 weight quantization does; the result is
    returned in ``w``'s dtype, so the rest of the computation is unchanged.
    """
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=reduce_axis, keepdims=True)
    scale = jnp.where(amax > 0, amax / FP8_E4M3_MAX, 1.0)
    w_fp8 = (w32 / scale).astype(jnp.float8_e4m3fn)
    return (w_fp8.astype(jnp.float32) * scale).astype(w.dtype)


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def _path_key(key: jax.Array, names: tuple[str, ...]) -> jax.Array:
    return jax.random.fold_in(key, zlib.crc32("/".join(names).encode()) & 0x7FFFFFFF)


def expert_scale_error(w: jax.Array, expert_axis: int, std: float, key: jax.Array) -> jax.Array:
    """``w`` with every slice along ``expert_axis`` (one expert) scaled by (1 + std·ε_e),
    ε_e ~ N(0, 1) from ``key``: an error proportional to the weights themselves."""
    num_experts = w.shape[expert_axis]
    shape = [1] * w.ndim
    shape[expert_axis] = num_experts
    eps = jax.random.normal(key, (num_experts,), jnp.float32).reshape(shape)
    return w.astype(jnp.float32) * (1.0 + std * eps)


def prepare_variables(variables: Any, precision: InferencePrecision, version: Any) -> Any:
    """Trainer variables → the engine's: {'params': cast (and perturbed), 'router': as is}.

    Jittable (the engine runs it on device, so a weight sync never visits the host).
      * every floating param is cast to ``precision.dtype``;
      * ``fp8_expert_weights``: routed-expert weights (``moe/{gate,up,down}``, [E, in, out]) are
        fake-quantized to e4m3 per output channel (`fake_quantize_fp8`);
      * ``expert_scale_error_std`` σ_s: expert e's router column (W [D, E]) and its routed-expert
        weights ([E, in, out]) are scaled by (1 + σ_s·ε_e), ε_e drawn per parameter from
        ``expert_scale_error_seed`` alone (`expert_scale_error`; module docstring: why it
        compounds);
      * ``router_noise_std`` σ: each router weight matrix W [D, E] gets a fixed Gaussian
        perturbation δ ~ N(0, σ²/D), drawn from ``version`` (so every engine holding the same
        version agrees). A token's router logits then move by h·δ, noise of std σ·rms(h); with
        the RMS-normalised inputs the router sees, that is ≈ σ per logit. (Perturbing the weights
        rather than each forward's logits needs no RNG inside the model's decode step.)
    The 'router' collection (the selection-only expert bias) stays float32.
    """
    dtype = precision.jnp_dtype
    noise_key = jax.random.fold_in(jax.random.PRNGKey(0), version)
    scale_key = jax.random.PRNGKey(precision.expert_scale_error_seed)

    def convert(path, w):
        names = _path_names(path)
        if not jnp.issubdtype(w.dtype, jnp.floating):
            return w
        is_moe = names[-2:-1] == ("moe",)
        if precision.expert_scale_error_std > 0 and is_moe and (
                names[-1] == "router" or (names[-1] in ("gate", "up", "down") and w.ndim == 3)):
            w = expert_scale_error(w, -1 if names[-1] == "router" else 0,
                                   precision.expert_scale_error_std, _path_key(scale_key, names))
        if precision.router_noise_std > 0 and is_moe and names[-1] == "router":
            key = _path_key(noise_key, names)
            noise = jax.random.normal(key, w.shape, jnp.float32)
            w = w.astype(jnp.float32) + noise * (precision.router_noise_std / w.shape[0] ** 0.5)
        w = w.astype(dtype)
        if (precision.fp8_expert_weights and names[-2:-1] == ("moe",)
                and names[-1] in ("gate", "up", "down") and w.ndim == 3):
            w = fake_quantize_fp8(w, reduce_axis=1)
        return w

    prepared = dict(variables)
    prepared["params"] = jax.tree_util.tree_map_with_path(convert, variables["params"])
    return prepared
