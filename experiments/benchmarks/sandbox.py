"""Sandbox throughput/latency and reward-scoring throughput, side by side in one run.

  python experiments/benchmarks/sandbox.py
  python experiments/benchmarks/sandbox.py --runs=60 --workers=1,2,4

Prints:
  1. start-up latency (median, p95) of a trivial program (``pass``) for: a bare
     ``subprocess.run(python -c pass)`` (the floor), the sandbox in "rlimits" mode, and the
     sandbox in "namespaces" mode (unshare + launcher + unprivileged interpreter), with the
     ratios to the floor;
  2. sandbox executions/s of the trivial program through a SandboxPool, per worker count;
  3. scoring throughput (scores/s): math-verify (MathFileTask) on distinct fraction answers in 1
     and 2 threads, a procedural task (addition) for scale, and the code task (the bundled
     sample's reference solutions, tests run in the sandbox).
"""
from __future__ import annotations

import concurrent.futures
import statistics
import subprocess
import sys
import time

from absl import app, flags

from ring_jax.data import tasks
from ring_jax.data.sandbox import (SandboxConfig, SandboxPool, namespaces_available, run_python,
                                   user_namespaces_available)
from ring_jax.data.tasks.base import PromptRecord

FLAGS = flags.FLAGS
flags.DEFINE_integer("runs", 40, "sequential runs per latency measurement / pool runs per count")
flags.DEFINE_list("workers", ["1", "2", "4"], "SandboxPool worker counts")
flags.DEFINE_integer("math_scores", 300, "distinct math responses scored per measurement")


def percentiles(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs), xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def time_calls(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def bench_latency(modes: list[str]) -> None:
    print("== 1. start-up latency of a trivial program (ms) ==")
    floor = time_calls(lambda: subprocess.run([sys.executable, "-I", "-S", "-c", "pass"],
                                              check=True), FLAGS.runs)
    floor_med, floor_p95 = percentiles(floor)
    print(f"  bare subprocess python -c pass : median {1e3 * floor_med:6.1f}  "
          f"p95 {1e3 * floor_p95:6.1f}  (1.00x)")
    for mode in modes:
        cfg = SandboxConfig(isolation=mode)
        result = run_python("pass", cfg)  # warm the probe/caches outside the timing
        assert result.ok, result
        lat = time_calls(lambda: run_python("pass", cfg), FLAGS.runs)
        med, p95 = percentiles(lat)
        print(f"  sandbox isolation={mode:<10}     : median {1e3 * med:6.1f}  "
              f"p95 {1e3 * p95:6.1f}  ({med / floor_med:.2f}x the floor)")


def bench_pool(mode: str) -> None:
    print(f"== 2. sandbox executions/s, trivial program, isolation={mode} ==")
    cfg = SandboxConfig(isolation=mode)
    base = None
    for workers in map(int, FLAGS.workers):
        with SandboxPool(cfg, num_workers=workers) as pool:
            pool.map(["pass"] * workers)  # start the threads
            start = time.perf_counter()
            results = pool.map(["pass"] * FLAGS.runs)
            rate = FLAGS.runs / (time.perf_counter() - start)
        assert all(r.ok for r in results)
        base = base or rate
        print(f"  workers={workers}: {rate:6.1f} exec/s  ({rate / base:.2f}x workers=1)")


def bench_scoring() -> None:
    print("== 3. reward scoring throughput (scores/s) ==")
    math_task = tasks.get("math")
    math_task.score(math_task.sample(0, 0), "\\boxed{1}")  # import math-verify untimed

    def responses(offset: int) -> list[tuple[PromptRecord, str]]:
        # Distinct strings per measurement: math-verify/latex2sympy cache parses, and a
        # repeated set would measure the cache.
        out = []
        for i in range(offset, offset + FLAGS.math_scores):
            record = PromptRecord("math", i, 0, "", "", metadata={"gold": f"\\frac{{{i}}}{{7}}"})
            out.append((record, f"so it is</think>\\boxed{{\\frac{{{2 * i}}}{{14}}}}"))
        return out

    rates = {}
    for threads in (1, 2):
        batch = responses(threads * 100_000)
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            scores = list(pool.map(lambda rr: math_task.score(*rr).reward, batch))
            rates[threads] = len(batch) / (time.perf_counter() - start)
        assert all(s == 1.0 for s in scores)
        print(f"  math-verify (MathFileTask), {threads} thread(s): {rates[threads]:8.1f} "
              f"scores/s  ({rates[threads] / rates[1]:.2f}x 1 thread)")
    add = tasks.get("addition", min_size=2, max_size=3)
    add_pairs = [(r, r.solution_text()) for r in (add.sample(i, 0) for i in range(2000))]
    start = time.perf_counter()
    assert all(add.score(*p).reward == 1.0 for p in add_pairs)
    add_rate = len(add_pairs) / (time.perf_counter() - start)
    print(f"  addition (procedural), 1 thread    : {add_rate:8.1f} scores/s  "
          f"({add_rate / rates[1]:.1f}x math-verify)")
    code = tasks.get("code")
    code_pairs = [(r, r.solution_text()) for r in (code.sample(i, 0)
                                                   for i in range(code.num_examples))]
    start = time.perf_counter()
    assert all(code.score(*p).reward == 1.0 for p in code_pairs)
    code_rate = len(code_pairs) / (time.perf_counter() - start)
    print(f"  code (sandboxed tests), 1 thread   : {code_rate:8.1f} scores/s  "
          f"({rates[1] / code_rate:.1f}x slower than math-verify)")


def main(argv):
    del argv
    modes = ["rlimits"] + [mode for mode, ok in (("namespaces", namespaces_available()),
                                                 ("user_namespaces", user_namespaces_available()))
                           if ok]
    print(f"isolation modes available: {modes}")
    bench_latency(modes)
    bench_pool(modes[-1])
    bench_scoring()


if __name__ == "__main__":
    app.run(main)
