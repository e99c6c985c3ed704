"""The engine's inference precision policy, separate from the trainer's (PAPER §1).

The rollout engine and the trainer share the model code but not its numerics: by default the
engine keeps weights, activations and the KV cache in bfloat16 while the trainer recomputes
log-probs in float32. That gap is the training–inference mismatch IcePop corrects. The policy
can also remove it (``dtype="float32"``, for exact parity checks) or widen it on purpose:
fp8 (e4m3) quantize-dequantized expert weights, as an fp8 serving stack would use, and Gaussian
noise on the router logits, which flips near-tied expert choices (the MoE failure mode).
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

    def __post_init__(self):
        config_lib.check_one_of("dtype", self.dtype, DTYPES)
        config_lib.check_float("router_noise_std", self.router_noise_std, min_value=0.0)

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


def prepare_variables(variables: Any, precision: InferencePrecision, version: Any) -> Any:
    """Trainer variables → the engine's: {'params': cast (and perturbed), 'router': as is}.

    Jittable (the engine runs it on device, so a weight sync never visits the host).
      * every floating param is cast to ``precision.dtype``;
      * ``fp8_expert_weights``: routed-expert weights (``moe/{gate,up,down}``, [E, in, out]) are
        fake-quantized to e4m3 per output channel (`fake_quantize_fp8`);
      * ``router_noise_std`` σ: each router weight matrix W [D, E] gets a fixed Gaussian
        perturbation δ ~ N(0, σ²/D), drawn from ``version`` (so every engine holding the same
        version agrees). A token's router logits then move by h·δ, noise of std σ·rms(h); with
        the RMS-normalised inputs the router sees, that is ≈ σ per logit. (Perturbing the weights
        rather than each forward's logits needs no RNG inside the model's decode step.)
    The 'router' collection (the selection-only expert bias) stays float32.
    """
    dtype = precision.jnp_dtype
    noise_key = jax.random.fold_in(jax.random.PRNGKey(0), version)

    def convert(path, w):
        names = _path_names(path)
        if not jnp.issubdtype(w.dtype, jnp.floating):
            return w
        if precision.router_noise_std > 0 and names[-2:-1] == ("moe",) and names[-1] == "router":
            key = jax.random.fold_in(noise_key, zlib.crc32("/".join(names).encode()) & 0x7FFFFFFF)
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
