"""experiments/benchmarks/c3po_gpu.py at its ``--tiny`` size on CPU: the accelerator check's
code path (bf16 engine and trainer, ragged MoE, warm-up, sync / c3po / paced arms) runs without
an accelerator and reports sane figures."""
from __future__ import annotations

import importlib.util
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_bench():
    path = os.path.join(ROOT, "experiments", "benchmarks", "c3po_gpu.py")
    spec = importlib.util.spec_from_file_location("_c3po_gpu", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["_c3po_gpu"] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_size_runs_every_arm_on_cpu():
    bench = _load_bench()
    size = bench.TINY
    assert (size.dtype, size.moe_impl) == (bench.GPU.dtype, bench.GPU.moe_impl)  # same path
    assert (bench.GPU.num_slots, bench.GPU.max_new, bench.GPU.dtype) == (64, 2048, "bfloat16")
    result = bench.measure(size, num_batches=1, warmup_batches=1)
    assert result["platform"] == "cpu" and not result["skipped"]
    names = list(result["arms"])
    assert names[0] == "sync" and [n.split()[0] for n in names] == ["sync", "c3po", "paced"]
    sync = result["arms"]["sync"]
    assert sync["rollout_x_sync"] == 1.0 and sync["e2e_x_sync"] == 1.0
    for name, r in result["arms"].items():
        assert math.isfinite(r["rollout_x_sync"]) and r["rollout_x_sync"] > 0, name
        assert 0 < r["share"] <= 1, name
        # Every trained response has a scripted length inside the mix's range.
        assert size.short[0] <= r["mean_len"] <= size.long[1], name
        assert r["max_spanned"] <= bench.SIGMA_MAX + 1, name
    paced = next(r for n, r in result["arms"].items() if n.startswith("paced"))
    assert paced["purged"] == 0.0  # pacing never purges
    assert sync["spanned"] == 1.0  # sync trains every response at one version
