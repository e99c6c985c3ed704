"""kill -9 and resume in the multi-process layout: the RL loop on 2 processes x 4 fake CPU
devices (jax.distributed over localhost, `launch/multiprocess_localhost.sh`) with the rollout
engine over the pod-wide mesh (`mesh.engine.layout=global`, experts over `expert`), both
processes SIGKILLed after an RL checkpoint and rerun: every step's metrics equal an
uninterrupted run's in the same layout, bit for bit.

What a plausible bug gives instead: a checkpoint written by one process only (or a process
restoring another's shards) fails the restore or changes the step-2 loss; an engine restarted
with the initial weights instead of the restored ones changes the step-2 rollouts (rewards,
log-probs, |Δlogp|); a scheduler state restored on one process only desynchronises the two
controllers, which then hang (the launcher's timeout) or diverge.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(ROOT, "launch", "multiprocess_localhost.sh")
# Compared across runs: everything computed from data and weights (not clocks).
DETERMINISTIC_PREFIXES = ("rl/", "train/", "mismatch/", "eval/", "moe/", "sched/total/")
# Training mesh data 2 x fsdp 4; engine mesh data 2 x expert 4 over the same 8 devices, so the
# tiny preset's 8 experts are split over devices both processes own. Greedy evaluation on the
# run's engine: one engine fewer to compile (the test's time is mostly compiles).
OVERRIDES = ("--config.rl.num_steps=2", "--config.mesh.data=2", "--config.mesh.fsdp=4",
             "--config.mesh.engine.layout=global", "--config.mesh.engine.data=2",
             "--config.mesh.engine.expert=4", "--config.eval.greedy_engine=engine")
KILL_AFTER_STEP = 1


def _launch_cmd(workdir):
    return ["bash", LAUNCHER, "-n", "2", "-d", "4", "--",
            f"--config={os.path.join(ROOT, 'experiments', 'quickstart.py')}:smoke",
            f"--workdir={workdir}", *OVERRIDES]


def _env(logdir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "PYTHON": sys.executable,
           "LOGDIR": str(logdir)}
    for name in ("RING_JAX_COORDINATOR", "RING_JAX_NUM_PROCESSES", "RING_JAX_PROCESS_ID",
                 "RING_JAX_DISTRIBUTED", "XLA_FLAGS", "RING_JAX_MODULE", "PORT"):
        env.pop(name, None)
    return env


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(DETERMINISTIC_PREFIXES)}
            for r in rows}


def _committed_steps(workdir):
    """RL checkpoint steps orbax has committed (a step being written has a temporary name)."""
    path = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def _run_to_end(workdir, logdir):
    proc = subprocess.run(_launch_cmd(workdir), env=_env(logdir), cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


@pytest.mark.slow
def test_two_process_global_engine_sigkill_resume_matches_uninterrupted(tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    _run_to_end(reference, tmp_path / "logs_reference")

    # The launcher and both trainer processes share a new process group: one killpg SIGKILLs
    # all of them at once, as a lost host does (no finally, no pending save waited for).
    proc = subprocess.Popen(_launch_cmd(resumed), env=_env(tmp_path / "logs_killed"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 1200
        while time.time() < deadline and proc.poll() is None:
            if KILL_AFTER_STEP in _committed_steps(resumed):
                # Somewhere in the next step: rollout, train or the next save.
                time.sleep(float(np.random.default_rng(0).uniform(0.0, 2.0)))
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the kill"
        assert KILL_AFTER_STEP in _committed_steps(resumed), "no RL checkpoint within the deadline"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # The rerun restores a checkpoint (not a fresh start) and must finish the remaining steps.
    assert _committed_steps(resumed)[-1] < 2, "the killed run had already finished"

    _run_to_end(resumed, tmp_path / "logs_resumed")
    got, want = _metrics(resumed), _metrics(reference)
    assert sorted(want) == [0, 1, 2]  # step 0 = evaluation after SFT
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step].keys() == want[step].keys(), step
        for key, value in want[step].items():
            np.testing.assert_allclose(got[step][key], value, rtol=0, atol=0,
                                       err_msg=f"step {step} {key}")
