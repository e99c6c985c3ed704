"""Shared timing helpers for the model benchmarks: median wall time of a jitted call, and the
machine's practical matmul peak measured on a square matmul of a given FLOP count,
interleaved with the measured call so that load drift on a shared machine hits both alike."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def median_seconds(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    return float(np.median([_seconds(fn, *args) for _ in range(repeats)]))


def peak_matmul(flops: float, dtype=jnp.float32):
    """(jitted matmul thunk, its FLOPs): an N×N×N matmul with 2N³ ≈ `flops`, N in
    [256, 4096]."""
    n = int(np.clip(round((flops / 2) ** (1 / 3) / 64) * 64, 256, 4096))
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(matmul(a, b))
    return (lambda: matmul(a, b)), 2 * n ** 3


def interleaved(fn, flops: float, repeats: int = 5, *args) -> tuple[float, float]:
    """Median seconds of `fn(*args)` and median of (its FLOP rate / the matmul's FLOP rate),
    timing one matmul of the same FLOPs right before each call."""
    matmul, matmul_flops = peak_matmul(flops)
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times, ratios = [], []
    for _ in range(repeats):
        t_peak = _seconds(matmul)
        t = _seconds(fn, *args)
        times.append(t)
        ratios.append((flops / t) / (matmul_flops / t_peak))
    return float(np.median(times)), float(np.median(ratios))
