"""End to end with the async scheduler: the loop reads its batches through the scheduler's grain
dataset while the producer thread generates (and assembles batches) ahead; a run killed with
SIGKILL during an RL step resumes to exactly the metrics of an uninterrupted run (CPU)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Computed from data and weights. The producer's own running totals (generated tokens, ...)
# depend on how far it ran ahead when the step's metrics were taken, so of `sched/total/` only
# what reached the trainer is compared.
DETERMINISTIC_PREFIXES = ("rl/", "train/", "mismatch/", "eval/", "moe/", "sched/total/trained_")
ASYNC = ("--config.scheduler.mode=async", "--config.scheduler.prefetch_batches=2")


def _cmd(workdir):
    return [sys.executable, "-m", "ring_jax.main",
            f"--config={os.path.join(ROOT, 'experiments', 'quickstart.py')}:smoke",
            f"--workdir={workdir}", *ASYNC]


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}


def _metrics(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(DETERMINISTIC_PREFIXES)}
            for r in rows}


def _run(workdir):
    proc = subprocess.run(_cmd(workdir), env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_async_sigkill_and_resume_matches_uninterrupted(tmp_path):
    reference = str(tmp_path / "reference")
    _run(reference)
    workdir = str(tmp_path / "killed")
    proc = subprocess.Popen(_cmd(workdir), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if 1 in _metrics(workdir):  # step 1 is checkpointed right after its metrics
            time.sleep(0.5)  # inside step 2, the producer running ahead
            break
        time.sleep(0.1)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    _run(workdir)
    resumed, expected = _metrics(workdir), _metrics(reference)
    assert sorted(resumed) == sorted(expected) == [0, 1, 2, 3]
    assert any(k.startswith("sched/total/trained_") for k in expected[3])
    for step in expected:
        assert resumed[step].keys() == expected[step].keys(), step
        for key, value in expected[step].items():
            np.testing.assert_allclose(resumed[step][key], value, rtol=0, atol=0,
                                       err_msg=f"step {step} {key}")
