"""MoE layer throughput per dispatch implementation, side by side (PAPER §4 MoE block).

Routed experts of the `small` preset (E=32, K=4, D=256, F=256) on X tokens: forward and
forward+backward tokens/s for the loop-over-experts reference, capacity dispatch and dropless
ragged_dot, plus their speed-up over the reference and their useful FLOP rate relative to a
matmul of the same FLOPs timed right before each call (the machine's practical peak).

    .venv/bin/python experiments/benchmarks/moe_layer.py [--tokens 2048] [--capacity_factor 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved  # noqa: E402

from ring_jax.model import moe, presets  # noqa: E402
from ring_jax.model import router as router_lib  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--capacity_factor", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    cfg = presets.get("small", capacity_factor=args.capacity_factor)
    E, D, F, K = (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                  cfg.num_experts_per_tok)
    X = args.tokens
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (1, X, D))
    routing = router_lib.route(jax.random.normal(ks[1], (X, E)), jnp.zeros(E), cfg)
    ids, w = routing.ids_XK.reshape(1, X, K), routing.weights_XK.reshape(1, X, K)
    valid = jnp.ones((1, X), bool)
    weights = [jax.random.normal(k, s) * 0.05 for k, s in
               zip(ks[2:], [(E, D, F), (E, D, F), (E, F, D)])]
    useful_fwd = 2 * X * K * 3 * D * F  # FLOPs of the chosen experts only

    print(f"jax {jax.__version__} {jax.devices()[0].platform}; X={X} tokens, E={E}, K={K}, "
          f"D={D}, F={F}, capacity_factor={args.capacity_factor}")
    print(f"{'impl':10s} {'fwd tok/s':>11s} {'fwd+bwd tok/s':>14s} {'fwd+bwd x ref':>14s} "
          f"{'useful fwd+bwd FLOP/s / peak':>29s} {'dropped':>8s}")
    results = {}
    for impl in ("reference", "capacity", "ragged"):
        c = dataclasses.replace(cfg, moe_impl=impl)

        def fwd(x, *ws, c=c):
            return moe.dispatch_experts(x, ids, w, valid, *ws, c)

        def loss(x, *ws, c=c):
            y, _ = moe.dispatch_experts(x, ids, w, valid, *ws, c)
            return jnp.sum(y * y)

        fwd_s, _ = interleaved(jax.jit(fwd), useful_fwd, args.repeats, x, *weights)
        bwd_s, bwd_util = interleaved(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))),
                                      3 * useful_fwd, args.repeats, x, *weights)
        dropped = float(jax.jit(fwd)(x, *weights)[1]) / (X * K)
        results[impl] = bwd_s
        print(f"{impl:10s} {X / fwd_s:11.0f} {X / bwd_s:14.0f} "
              f"{results['reference'] / bwd_s:14.2f} {bwd_util:29.1%} "
              f"{dropped:8.2%}")


if __name__ == "__main__":
    main()
