"""SIGTERM stops a loop after the step in progress, with a checkpoint of that step and exit
code 75; the run resumes from it with nothing lost (fast: a tiny loop in a subprocess; slow:
the quickstart's smoke run, resumed to the metrics of an uninterrupted run)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax.train import checkpoint, preemption

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")

_LOOP = textwrap.dedent("""
    import sys, time, jax.numpy as jnp
    from ring_jax.train import checkpoint, preemption
    # save_every is never due: the only saves are the preemption's.
    ckpt = checkpoint.Checkpointer(sys.argv[1], checkpoint.CheckpointConfig(save_every=10**6))
    start = ckpt.latest_step() or 0
    with preemption.StopOnSignal() as stop, ckpt:
        for step in range(start + 1, start + 10**6):
            time.sleep(0.05)   # the step's work
            print(step, flush=True)
            preempted = stop.should_stop()
            if ckpt.due(step) or preempted:
                ckpt.save(step, state={"step": jnp.asarray(step)}, meta={"step": step})
            if preempted:
                stop.exit(step, ckpt)
""")


def _run_until_terminated(directory, after_step):
    proc = subprocess.Popen([sys.executable, "-c", _LOOP, str(directory)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    steps = []
    for line in proc.stdout:
        steps.append(int(line))
        if steps[-1] == after_step:
            proc.send_signal(signal.SIGTERM)
            break
    steps += [int(line) for line in proc.stdout]
    proc.wait(timeout=60)
    return proc.returncode, steps, proc.stderr.read()


def test_sigterm_saves_the_last_finished_step_and_exits_75(tmp_path):
    rc, steps, stderr = _run_until_terminated(tmp_path, after_step=3)
    assert rc == preemption.EXIT_CODE == 75, stderr
    last = steps[-1]
    assert last >= 3 and steps == list(range(1, last + 1))
    assert f"SIGTERM received: stopped after step {last}" in stderr
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        # Without the handler: no checkpoint at all (save_every is never due).
        assert ckpt.all_steps() == [last]
        assert ckpt.restore({"step": jnp.asarray(0)}).meta == {"step": last}


def test_handler_restored_and_idle_outside_the_block():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.StopOnSignal() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)   # handled: sets the flag, the test lives on
        time.sleep(0.01)
        assert stop.should_stop() and stop.received == signal.SIGTERM
        # A second TERM would get the previous behaviour (here: pytest's default).
        assert signal.getsignal(signal.SIGTERM) == before
    assert signal.getsignal(signal.SIGTERM) == before


def test_preempted_is_a_system_exit_with_code_75():
    err = preemption.Preempted(7)
    assert isinstance(err, SystemExit) and err.code == 75 and err.step == 7


# ------------------------------------------------------------------ end to end (slow)

DETERMINISTIC_PREFIXES = ("rl/", "train/", "mismatch/", "eval/", "moe/", "sched/total/")


def _cmd(workdir, *extra):
    return [sys.executable, "-m", "ring_jax.main",
            f"--config={os.path.join(REPO, 'experiments', 'quickstart.py')}:smoke",
            f"--workdir={workdir}", *extra]


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(DETERMINISTIC_PREFIXES)}
            for r in rows}


@pytest.mark.slow
def test_sigterm_mid_rl_resumes_identical(tmp_path):
    """SIGTERM during RL step 2 (saves every 100 steps: only the preemption saves): exit 75
    with a checkpoint of the last finished step; rerunning finishes with the metrics of an
    uninterrupted run."""
    reference, workdir = str(tmp_path / "reference"), str(tmp_path / "preempted")
    extra = ("--config.checkpoint.save_every=100",)
    proc = subprocess.run(_cmd(reference, *extra), env=ENV, cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.Popen(_cmd(workdir, *extra), env=ENV, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and 1 in _metrics(workdir):
            time.sleep(1.0)   # into step 2
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=600)[1]
    assert proc.returncode == 75, stderr[-3000:]
    stopped = max(_metrics(workdir))
    assert f"stopped after step {stopped}" in stderr
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        assert ckpt.all_steps() == [stopped]   # no finished step lost
    proc = subprocess.run(_cmd(workdir, *extra), env=ENV, cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, expected = _metrics(workdir), _metrics(reference)
    assert sorted(resumed) == sorted(expected)
    for step in expected:
        for key, value in expected[step].items():
            np.testing.assert_allclose(resumed[step][key], value, rtol=0, atol=0,
                                       err_msg=f"step {step} {key}")
