"""Shared timing helpers for the model benchmarks: median wall time of a jitted call, and the
machine's practical matmul peak measured on a square matmul of a given FLOP count."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def median_seconds(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_peak_flops(flops: float, dtype=jnp.float32, repeats: int = 5) -> float:
    """FLOP/s of an N×N×N matmul with 2N³ ≈ `flops` (capped to N in [256, 4096])."""
    n = int(np.clip(round((flops / 2) ** (1 / 3) / 64) * 64, 256, 4096))
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    seconds = median_seconds(jax.jit(lambda a, b: a @ b), a, b, repeats=repeats)
    return 2 * n ** 3 / seconds
