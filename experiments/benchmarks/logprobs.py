"""Chunked vs naive per-token log-prob + entropy: peak memory and time, side by side.

Memory comes from the compiled executables' `memory_analysis()` at the full configuration
(Ling's vocabulary V=157184, T=4096, B=1, hidden 2048, bf16 hidden and W, float32 logits), for
the forward pass and for forward+backward (gradient w.r.t. hidden and W, as in training).
Compiling is cheap; running the full configuration is not on a shared 2-core CPU (one
[4096, 2048] x [2048, 157184] matmul is 2.6 TFLOP, ~15-50 s here), so the time is measured at
the same V, D and chunk but ``--time_tokens`` positions (default 512), one run each after
compilation. On a quiet machine ``--time_tokens=4096`` times the full configuration.

Usage (figures and date in experiments/BENCHMARKS.md, "Chunked log-probs"):
  PYTHONPATH=. .venv/bin/python experiments/benchmarks/logprobs.py
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

from ring_jax.rl import logprobs


def naive(hidden_BTD, w_DV, targets_BT):
    logits_BTV = jnp.einsum("btd,dv->btv", hidden_BTD, w_DV, preferred_element_type=jnp.float32)
    return logprobs.logprobs_from_logits(logits_BTV, targets_BT)


def with_grad(fn):
    """Forward + backward as a trainer runs it: d(Σ logp + Σ entropy) / d(hidden, W)."""
    def loss(hidden_BTD, w_DV, targets_BT):
        logp_BT, entropy_BT = fn(hidden_BTD, w_DV, targets_BT)
        return jnp.sum(logp_BT) + jnp.sum(entropy_BT)
    return jax.value_and_grad(loss, argnums=(0, 1))


def make_inputs(batch, tokens, hidden, vocab):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hidden_BTD = jax.random.normal(k1, (batch, tokens, hidden), jnp.bfloat16)
    w_DV = (jax.random.normal(k2, (hidden, vocab)) * hidden ** -0.5).astype(jnp.bfloat16)
    targets_BT = jax.random.randint(k3, (batch, tokens), 0, vocab)
    return hidden_BTD, w_DV, targets_BT


def compile_shapes(fn, inputs):
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs]
    return jax.jit(fn).lower(*shapes).compile()


def gib(n):
    return f"{n / 2 ** 30:7.3f} GiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=157184)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--time_tokens", type=int, default=512)
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()
    chunked = functools.partial(logprobs.token_logprobs_and_entropy, chunk_size=args.chunk)
    variants = {
        "forward": {"naive": naive, "chunked": chunked},
        "forward+backward": {"naive": with_grad(naive), "chunked": with_grad(chunked)},
    }
    print(f"jax {jax.__version__} {jax.devices()[0].platform}; B={args.batch} "
          f"T={args.tokens} D={args.hidden} V={args.vocab} chunk={args.chunk}; bf16 inputs, "
          f"float32 logits")

    print(f"\nmemory (compiled memory_analysis, T={args.tokens}):")
    full = [jax.ShapeDtypeStruct(s, d) for s, d in (
        ((args.batch, args.tokens, args.hidden), jnp.bfloat16),
        ((args.hidden, args.vocab), jnp.bfloat16), ((args.batch, args.tokens), jnp.int32))]
    memory = {}
    for mode, fns in variants.items():
        for name, fn in fns.items():
            m = compile_shapes(fn, full).memory_analysis()
            memory[mode, name] = (m.temp_size_in_bytes,
                                  m.temp_size_in_bytes + m.argument_size_in_bytes
                                  + m.output_size_in_bytes - m.alias_size_in_bytes)
            print(f"  {mode:17s} {name:8s} temp {gib(memory[mode, name][0])}   "
                  f"args+outputs+temp {gib(memory[mode, name][1])}")
        (nt, na), (ct, ca) = memory[mode, "naive"], memory[mode, "chunked"]
        print(f"  {mode:17s} naive/chunked: temp {nt / ct:5.1f}x   total {na / ca:5.1f}x")

    if not args.time_tokens:
        return
    print(f"\ntime (T={args.time_tokens}, best of {args.reps} run(s) after compilation):")
    inputs = make_inputs(args.batch, args.time_tokens, args.hidden, args.vocab)
    for mode, fns in variants.items():
        seconds = {}
        for name, fn in fns.items():
            compiled = compile_shapes(fn, inputs)
            best = float("inf")
            for _ in range(args.reps):
                start = time.perf_counter()
                jax.block_until_ready(compiled(*inputs))
                best = min(best, time.perf_counter() - start)
            seconds[name] = best
            print(f"  {mode:17s} {name:8s} {best:7.2f} s")
        print(f"  {mode:17s} chunked/naive time: {seconds['chunked'] / seconds['naive']:.2f}x")


if __name__ == "__main__":
    main()
