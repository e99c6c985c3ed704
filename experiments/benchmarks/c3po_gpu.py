"""The real-engine C3PO++ benchmark at an accelerator's size, in under 5 minutes (issue 14).

The same measurement as ``experiments/benchmarks/c3po.py --engine=real`` (the rollout engine,
a real jitted SGD train step, weights synced to the engine after every batch, response lengths
scripted to a long-tailed mix, the engine's prefill bucket grid compiled before anything is
timed), at the shapes where the paper's claim is made: bf16 engine and trainer, a larger MoE
(`GPU`: 8 layers, d = 1024, 64 experts top-8, 0.75 B parameters of which 0.13 B active,
dropless ``ragged`` dispatch), 64 slots, batches of 64 responses (G = 8), lengths 85%
U[128, 256] and 15% U[1536, 2048]. Arms: sync, C3PO++ (σ_max purge) and paced (admission
paced, nothing purged), each with Φ = one batch's expected tokens and σ_max = 4; printed as
rollout-phase and end-to-end seconds per 1k trained tokens and their ratios to sync, with the
purged fraction and mean trained length.

    python experiments/benchmarks/c3po_gpu.py                    # on a GPU (or TPU)
    python experiments/benchmarks/c3po_gpu.py --tiny             # any CPU, < 1 min
    python experiments/benchmarks/c3po_gpu.py --json=$OUT/c3po_gpu.json

``--tiny`` (`TINY`) runs the identical code path at toy shapes, so the script is tested on CPU
(tests/experiments/test_c3po_gpu_bench.py) and never needs an accelerator; without it the
script refuses to start on a CPU (it would run for hours) with a one-line message. The budget:
warm-up (compiles) ~1-2 min, then 3 arms × (``--gpu_warmup_batches`` + ``--gpu_batches``)
batches; ``--time_limit_s`` stops measuring further arms once exceeded and says so (the ratios
of the arms measured stand).
Expected on a GPU (not yet run: no device was lent to the session that wrote it): decode-bound
rollouts, so the paper's regime — C3PO++ rollout ≥ 2× sync — is what it checks.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import c3po as bench_lib  # noqa: E402  (experiments/benchmarks/c3po.py, beside this file)

GPU = bench_lib.RealSize(
    model="small",
    model_overrides=(("num_layers", 8), ("hidden_size", 1024), ("num_heads", 16),
                     ("num_kv_heads", 4), ("head_dim", 64), ("intermediate_size", 4096),
                     ("num_experts", 64), ("num_experts_per_tok", 8),
                     ("moe_intermediate_size", 512), ("n_group", 8), ("topk_group", 4),
                     # The train step on 64 × 2096 tokens: float32 scores 512 queries at a
                     # time and per-block remat keep it to a few GB.
                     ("attention_chunk", 512), ("remat_policy", "full")),
    dtype="bfloat16", moe_impl="ragged", num_slots=64, group_size=8, batch_size=64,
    prompt_len=(16, 48), short=(128, 256), long=(1536, 2048), long_frac=0.15,
    decode_chunk=32, min_prefill_len=128, refill_min_rows=8, step_chunk_tokens=2048)
# The same code path at toy shapes: one prefill bucket (rows = slots, length = max_len) so the
# warm-up compiles little; lengths 4-6 and 24-32: a tail ~5× longer, as in the GPU mix.
TINY = dataclasses.replace(
    bench_lib.RealSize(), model="tiny", dtype="bfloat16", moe_impl="ragged", num_slots=8,
    group_size=2, batch_size=8, prompt_len=(4, 8), short=(4, 6), long=(24, 32),
    decode_chunk=8, min_prefill_len=40, refill_min_rows=8, step_chunk_tokens=32)
SIGMA_MAX = 4

FLAGS = flags.FLAGS
flags.DEFINE_bool("tiny", False, "toy shapes (any CPU, seconds): the test's run")
flags.DEFINE_integer("gpu_batches", 4, "measured batches per arm")
flags.DEFINE_integer("gpu_warmup_batches", 1, "batches per arm before measuring")
flags.DEFINE_float("time_limit_s", 270.0, "no further arm starts after this many seconds")
flags.DEFINE_string("json", "", "also write the results here")


def measure(size: bench_lib.RealSize, num_batches: int, warmup_batches: int,
            time_limit_s: float = float("inf")) -> dict:
    """Builds the bench (warm-up compiles, untimed), runs the arms; returns a JSON-able dict."""
    start = time.perf_counter()
    bench = bench_lib.RealBench(size)
    arms = [arm for arm in bench_lib.arms(bench.config, bench.batch_tokens, SIGMA_MAX)
            if not arm[0].startswith("async")]  # one device: no overlap to measure
    num_prompts = (warmup_batches + num_batches + 4) * size.batch_size
    rows, skipped = [], []
    for name, config in arms:
        if time.perf_counter() - start > time_limit_s:
            skipped.append(name)
            continue
        rows.append((name, bench_lib.run(config, bench.make_engine, bench.train_step,
                                         num_prompts, warmup_batches, num_batches,
                                         size.prompt_len)))
        bench_lib.report(rows, only_last=len(rows) > 1)
    base = rows[0][1]
    return dict(
        platform=bench.platform, size=dataclasses.asdict(size), warmup_s=bench.warmup_s,
        num_batches=num_batches, warmup_batches=warmup_batches, skipped=skipped,
        total_s=time.perf_counter() - start,
        arms={name: {**r, "rollout_x_sync": base["rollout"] / r["rollout"],
                     "e2e_x_sync": base["e2e"] / r["e2e"]} for name, r in rows})


def main(argv):
    del argv
    import jax

    if jax.devices()[0].platform == "cpu" and not FLAGS.tiny:
        raise SystemExit("c3po_gpu.py: the GPU size needs an accelerator (this is a CPU); "
                         "pass --tiny for the toy shapes")
    size = TINY if FLAGS.tiny else GPU
    result = measure(size, FLAGS.gpu_batches, FLAGS.gpu_warmup_batches, FLAGS.time_limit_s)
    print(f"\n# {result['platform']}: warm-up {result['warmup_s']:.1f} s (not timed), "
          f"total {result['total_s']:.1f} s; {result['num_batches']} measured batches per arm "
          f"after {result['warmup_batches']}"
          + (f"; NOT RUN (time limit): {', '.join(result['skipped'])}" if result["skipped"]
             else ""))
    for name, r in result["arms"].items():
        print(f"{name:32s} rollout {r['rollout_x_sync']:5.2f}× sync, end to end "
              f"{r['e2e_x_sync']:5.2f}× sync; rollout share {100 * r['share']:3.0f}%, purged "
              f"{100 * r['purged']:4.1f}%, mean trained length {r['mean_len']:.0f}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
