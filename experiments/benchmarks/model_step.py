"""Forward and train-step throughput and MFU of the `small` preset per MoE dispatch
implementation.

Forward = the jitted model forward (logits) on B×T tokens; one train step = forward +
backward + AdamW update on the same tokens. Model FLOPs per token
follow the PaLM convention: 6·(active matmul params, embedding lookup excluded) +
12·L·H·Q·T (attention scores and values); MFU is those FLOPs per second over the FLOP rate of
a square matmul of the same total FLOPs measured in the same run (the machine's practical
peak), timed right before each measured call, so the load of a shared machine hits both alike.
`--impls` entries are dispatch names, optionally with a capacity factor (`capacity:1.25`) and
`+scan` for the MoE layers as one scan (`model.scan_layers`: `capacity+scan`). `compile s` is
the first train step's wall time (trace + compile + one run).

    .venv/bin/python experiments/benchmarks/model_step.py [--batch 8] [--seq 128]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved  # noqa: E402

from ring_jax.model import Transformer, presets  # noqa: E402


def model_flops_per_token(cfg, seq_len: int) -> float:
    _, active = presets.param_count(cfg)
    matmul_params = active - cfg.vocab_size * cfg.hidden_size  # the lookup is not a matmul
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return 6 * matmul_params + attention


def make_step(model, optimizer):
    def loss_fn(params, router, tokens):
        logits, aux = model.apply({"params": params, "router": router}, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
        return nll + 1e-4 * aux["moe/z_loss"]

    def step(params, opt_state, router, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, router, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--impls", default="reference,capacity,capacity:1.25,ragged")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_layers", type=int, default=0, help="0: the preset's depth")
    args = parser.parse_args()

    base = presets.get("small", **({"num_layers": args.num_layers} if args.num_layers else {}))
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq + 1), 0,
                                base.vocab_size)
    num_tokens = args.batch * args.seq
    flops = model_flops_per_token(base, args.seq) * num_tokens
    total, active = presets.param_count(base)
    print(f"jax {jax.__version__} {jax.devices()[0].platform}; small, {base.num_layers} layers: "
          f"{total / 1e6:.1f}M params, "
          f"{active / 1e6:.1f}M active; B={args.batch} T={args.seq}; "
          f"{flops / 1e9:.2f} GFLOP per step")
    print(f"{'impl':15s} {'fwd tok/s':>10s} {'fwd MFU':>8s} {'step s':>8s} {'train tok/s':>12s} "
          f"{'x ref':>6s} {'MFU':>6s} {'dropped':>8s} {'compile s':>9s}")
    ref_s = None
    for name in args.impls.split(","):
        dispatch, scan, _ = name.partition("+scan")
        impl, _, factor = dispatch.partition(":")
        cfg = dataclasses.replace(base, moe_impl=impl, scan_layers=bool(scan),
                                  capacity_factor=float(factor or base.capacity_factor))
        model = Transformer(cfg)
        variables = jax.jit(model.init)(jax.random.key(1), tokens[:, :-1])
        optimizer = optax.adamw(1e-4)
        step = make_step(model, optimizer)
        state = [variables["params"], optimizer.init(variables["params"])]

        def run():
            state[0], state[1], loss = step(state[0], state[1], variables["router"], tokens)
            return loss

        forward = jax.jit(lambda v, t: model.apply(v, t))
        dropped = float(forward(variables, tokens[:, :-1])[1]["moe/dropped_frac"])
        fwd_s, fwd_mfu = interleaved(lambda: forward(variables, tokens[:, :-1])[0], flops / 3,
                                     args.repeats)
        start = time.perf_counter()  # the step donates the params the forward above reads
        jax.block_until_ready(run())
        compile_s = time.perf_counter() - start
        seconds, mfu = interleaved(run, flops, args.repeats)
        ref_s = ref_s or (seconds if impl == "reference" else None)
        speedup = f"{ref_s / seconds:6.2f}" if ref_s else "   n/a"
        print(f"{name:15s} {num_tokens / fwd_s:10.0f} {fwd_mfu:8.1%} {seconds:8.3f} "
              f"{num_tokens / seconds:12.0f} {speedup} {mfu:6.1%} {dropped:8.2%} {compile_s:9.1f}")


if __name__ == "__main__":
    main()
