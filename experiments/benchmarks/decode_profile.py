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

``--op_profile`` then traces the engine's decode (`jax.profiler`: XLA:CPU records one event
per executed HLO op, its "thunk") and prints, per decode step, the ops' summed time by kind
(`op_kind`: matmul, elementwise fusion, sort, gather/scatter/slices, copies, ...), the number
of ops executed, and the summed op time against the step's wall time (the rest is the
runtime's own dispatch between ops and the host round trips):

    PYTHONPATH=. python experiments/benchmarks/decode_profile.py --batch_sizes=16,64 --moe_impls=dropless_capacity --op_profile
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


# Kinds of executed HLO ops, from the words of an op's name (XLA names an instruction after
# its opcode, a fusion after the ops it fused: "transpose_copy_fusion.11", "ynn_fusion.9" a
# YNNPACK matmul fusion, "wrapped_tanh" one op). Checked in this order; the first match wins.
OP_KINDS = (("matmul", ("ynn", "xnn", "dot", "convolution", "custom-call")),
            ("sort / top-k", ("sort", "topk")),
            ("gather / scatter / dynamic slices", ("gather", "scatter", "dynamic-slice",
                                                   "dynamic-update-slice")),
            ("reduce", ("reduce", "reduce-window")),
            ("rng", ("rng", "rng-bit-generator", "threefry2x32")))
LAYOUT_WORDS = {"copy", "transpose", "concatenate", "broadcast", "pad", "reshape", "bitcast",
                "iota", "slice"}
# Control flow: their events span the ops they run, which are recorded themselves.
CONTROL_OPS = ("cond", "conditional", "while", "call")


def op_kind(hlo_op: str) -> str:
    """The kind of an executed HLO op from its name ("ynn_fusion.9" -> "matmul")."""
    base = hlo_op.split(".")[0]
    if base in CONTROL_OPS:
        return "control"
    words = [w for w in base.removeprefix("wrapped_").split("_") if w != "fusion"]
    for kind, names in OP_KINDS:
        if any(w in names for w in words):
            return kind
    if words and all(w in LAYOUT_WORDS for w in words):
        return "copy / layout"
    return "elementwise"


def op_profile(engine, batch: int, new_tokens: int, trace_dir: str):
    """Traces one decode of `batch` requests × `new_tokens` tokens; returns the decode
    program's name, {op kind: seconds per decode step}, executed ops per step (control flow
    included), distinct ops, the traced run's wall seconds per token (its prefill included)
    and {op name: seconds per step}."""
    import glob  # noqa: PLC0415
    import time  # noqa: PLC0415
    from collections import Counter, defaultdict  # noqa: PLC0415
    jax.profiler.start_trace(trace_dir)
    t0 = time.perf_counter()
    run(engine, requests(batch, new_tokens))
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True),
                  key=os.path.getmtime)[-1]
    per_module = defaultdict(lambda: defaultdict(float))
    runs = defaultdict(set)
    count = Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" not in stats:
                    continue
                module = stats.get("hlo_module", "?")
                runs[module].add(stats.get("run_id"))
                count[module] += 1
                per_module[module][stats["hlo_op"]] += event.duration_ns * 1e-9
    # The decode program: the one with the most op time (prefill runs once per batch).
    decode = max(per_module, key=lambda m: sum(per_module[m].values()))
    steps = new_tokens - 1  # the first token comes from the prefill
    ops = {op: s / steps for op, s in per_module[decode].items() if op_kind(op) != "control"}
    kinds = defaultdict(float)
    for op, seconds in ops.items():
        kinds[op_kind(op)] += seconds
    num_ops = sum(1 for op in per_module[decode] if op_kind(op) != "control")
    return decode, dict(kinds), count[decode] / steps, num_ops, wall / new_tokens, ops


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch_sizes", default="16,64")
    parser.add_argument("--moe_impls", default="capacity,dropless_capacity")
    parser.add_argument("--timed_tokens", type=int, default=32)
    parser.add_argument("--op_profile", action="store_true",
                        help="also trace the decode and print its time per op kind")
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
        if args.op_profile:
            import tempfile  # noqa: PLC0415
            for impl, row in rows.items():
                module, kinds, executed, distinct, wall, ops = op_profile(
                    row[0], B, args.timed_tokens, tempfile.mkdtemp())
                busy = sum(kinds.values())
                print(f"  B={B} {impl} ({module}): {executed:.0f} ops executed per decode "
                      f"step ({distinct} distinct); summed op time {busy * 1e3:.1f} ms per "
                      f"step; traced run {wall * 1e3:.1f} ms wall per token (prefill "
                      f"included)")
                for kind, seconds in sorted(kinds.items(), key=lambda kv: -kv[1]):
                    print(f"    {kind:28s} {seconds * 1e3:7.2f} ms  {seconds / busy:5.1%}")
                top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
                print("    slowest ops: " + ", ".join(f"{op} {s * 1e3:.2f} ms" for op, s in top))


if __name__ == "__main__":
    main()
