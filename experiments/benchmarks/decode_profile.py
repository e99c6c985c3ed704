"""Where an engine decode step's time goes, against the roofline of `engine.py` (issue 16).

For each MoE dispatch and decode batch size B on the `small` preset (float32, the engine's KV
cache of max_len 288, every slot at position 160), side by side in one run:

  step     the engine's decode program per token step (`Engine.step`, B requests, 16 steps a
           chunk): model forward + sampling + slot bookkeeping + host round trips
  forward  the engine's cached model forward alone (B tokens, one position), jitted
  xla      the forward's own cost as XLA:CPU compiled it (`cost_analysis`): max(its FLOPs at
           the measured f32 matmul rate, its bytes accessed at the measured bandwidth) — the
           best this program could do if each of its kernels ran at the machine's peak (for
           `dropless_capacity` XLA counts every branch of the switch, so this overstates it)
  roofline `engine.decode_roofline`: all weights + the KV cache read once, or 2·active params +
           attention FLOPs per token, whichever is slower

    PYTHONPATH=. python experiments/benchmarks/decode_profile.py [--batch_sizes=16,64]

step/forward − 1 is the share of sampling and bookkeeping; forward/xla is how far XLA:CPU's
kernels run from peak; xla/roofline is the extra work the compiled program does (dispatch
buffers, unfused intermediates, capacity slack over the routed FLOPs).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import median_seconds  # noqa: E402
from engine import (PROMPT_LEN, decode_rate, decode_roofline, machine_roofline,  # noqa: E402
                    requests, run)

from ring_jax.model import Transformer, presets  # noqa: E402
from ring_jax.rollout import engine as engine_lib  # noqa: E402
from ring_jax.rollout.engine import Engine, EngineConfig  # noqa: E402
from ring_jax.rollout.precision import InferencePrecision  # noqa: E402

NEW_TOKENS = 256
CONTEXT = 160  # every slot's position in the forward-only timing


def forward_cost(cfg, variables, config, precision, impl):
    """(jitted forward thunk, XLA FLOPs, XLA bytes accessed) of one cached decode forward."""
    m = engine_lib.model_functions(cfg, config, precision, moe_impl=impl)
    weights = m.prepare_weights(variables, 0)
    B = config.num_slots
    cache = m.init_cache(B, config.max_len)
    # Distinct tokens: identical ones would all route alike and overflow every capacity.
    tokens = (jnp.arange(B, dtype=jnp.int32) * 37 % cfg.vocab_size)[:, None]
    positions = jnp.full((B, 1), CONTEXT, jnp.int32)
    fn = jax.jit(lambda w, t, p, c: m.forward(w, t, p, c)[0])
    cost = fn.lower(weights, tokens, positions, cache).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return (lambda: fn(weights, tokens, positions, cache)), cost["flops"], cost["bytes accessed"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch_sizes", default="16,64")
    parser.add_argument("--moe_impls", default="capacity,dropless_capacity")
    parser.add_argument("--timed_tokens", type=int, default=32)
    args = parser.parse_args()
    cfg = presets.get("small")
    precision = InferencePrecision("float32")
    variables = jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 8), jnp.int32))
    bandwidth, flops = machine_roofline()
    print(f"jax {jax.__version__}; small, float32; machine: {bandwidth / 1e9:.1f} GB/s, "
          f"{flops / 1e9:.0f} GFLOP/s; max_len {PROMPT_LEN + NEW_TOKENS}")
    print(f"{'B':>4s} {'dispatch':>17s} {'step ms':>8s} {'fwd ms':>7s} {'xla ms':>7s} "
          f"{'roof ms':>7s} {'XLA GFLOP':>9s} {'XLA MB':>7s} {'fwd/step':>8s} "
          f"{'xla/fwd':>7s} {'roof/step':>9s}")
    max_len = PROMPT_LEN + NEW_TOKENS
    for B in (int(b) for b in args.batch_sizes.split(",")):
        config = EngineConfig(num_slots=B, max_len=max_len, decode_chunk=16,
                              min_prefill_len=PROMPT_LEN)
        roof = B / decode_roofline(cfg, B, max_len, 4, bandwidth, flops)
        rows = {}
        for impl in args.moe_impls.split(","):
            engine = Engine.from_model(cfg, variables, config, precision, moe_impl=impl)
            run(engine, requests(B, 2))  # compile
            fwd, xla_flops, xla_bytes = forward_cost(cfg, variables, config, precision, impl)
            rows[impl] = [engine, fwd, xla_flops, xla_bytes, [], []]
        for _ in range(2):  # interleaved over the dispatches: the same background load
            for impl, row in rows.items():
                row[4].append(B / decode_rate(row[0], B, args.timed_tokens, repeats=1))
                row[5].append(median_seconds(row[1], repeats=5))
        for impl, (_, _, xla_flops, xla_bytes, steps, fwds) in rows.items():
            step, fwd = min(steps), min(fwds)
            xla = max(xla_flops / flops, xla_bytes / bandwidth)
            print(f"{B:4d} {impl:>17s} {step * 1e3:8.1f} {fwd * 1e3:7.1f} {xla * 1e3:7.1f} "
                  f"{roof * 1e3:7.1f} {xla_flops / 1e9:9.2f} {xla_bytes / 1e6:7.0f} "
                  f"{fwd / step:8.0%} {xla / fwd:7.0%} {roof / step:9.1%}")


if __name__ == "__main__":
    main()
