"""End to end: the absl entry point on the quickstart's `smoke` variant — a run writes its
config and metrics, and a run killed with SIGKILL at random points resumes to exactly the
metrics of an uninterrupted run (CPU)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Compared across runs: everything computed from data and weights (not clocks).
DETERMINISTIC_PREFIXES = ("rl/", "train/", "mismatch/", "eval/", "moe/", "sched/total/")


def _cmd(workdir, arg="smoke", extra=()):
    return [sys.executable, "-m", "ring_jax.main",
            f"--config={os.path.join(ROOT, 'experiments', 'quickstart.py')}:{arg}",
            f"--workdir={workdir}", *extra]


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(DETERMINISTIC_PREFIXES)}
            for r in rows}


def _run(workdir, **kw):
    proc = subprocess.run(_cmd(workdir, **kw), env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference"))
    _run(workdir)
    return workdir


@pytest.mark.slow
def test_run_writes_config_metrics_summary(reference_run):
    cfg = json.load(open(os.path.join(reference_run, "config.json")))
    assert cfg["rl"]["loss"]["correction"] == "icepop"
    metrics = _metrics(reference_run)
    assert sorted(metrics) == [0, 1, 2, 3]  # step 0 = evaluation after SFT
    for step in (1, 2, 3):
        assert np.isfinite(metrics[step]["train/loss"])
        assert metrics[step]["rl/response_tokens"] > 0
    summary = json.load(open(os.path.join(reference_run, "summary.json")))
    assert "eval/pass@1" in summary
    assert os.path.isdir(os.path.join(reference_run, "tensorboard"))


@pytest.mark.slow
def test_bad_override_fails_before_compiling(tmp_path):
    proc = subprocess.run(_cmd(str(tmp_path), extra=("--config.rl.loss.alpha=-2.0",)),
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "rl.loss.alpha=-2.0 is invalid" in proc.stderr
    assert not os.path.exists(os.path.join(tmp_path, "config.json"))


@pytest.mark.slow
def test_donated_state_run_matches_reference(reference_run, tmp_path):
    """``rl.donate_state``: the engine, the scheduler and evaluation keep working on copies of
    the weights the donated step deletes; every step's metrics equal the undonated run's."""
    _run(str(tmp_path), extra=("--config.rl.donate_state=True",))
    donated, reference = _metrics(str(tmp_path)), _metrics(reference_run)
    assert sorted(donated) == sorted(reference)
    for step in reference:
        for key, value in reference[step].items():
            np.testing.assert_allclose(donated[step][key], value, rtol=0, atol=0,
                                       err_msg=f"step {step} {key}")


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted(reference_run, tmp_path):
    """Kill -9 twice (once during RL step 1 or 2, once later), resume each time; the metrics of
    every step equal the uninterrupted run's."""
    workdir = str(tmp_path)
    rng = np.random.default_rng(0)
    for kill_after_step in (1, 2):
        proc = subprocess.Popen(_cmd(workdir), env=_env(), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        path = os.path.join(workdir, "metrics.jsonl")
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(path) and kill_after_step in _metrics(workdir):
                time.sleep(float(rng.uniform(0.0, 2.0)))  # somewhere in the next step
                break
            time.sleep(0.2)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    _run(workdir)
    resumed, reference = _metrics(workdir), _metrics(reference_run)
    assert sorted(resumed) == sorted(reference)
    for step in reference:
        assert resumed[step].keys() == reference[step].keys(), step
        for key, value in reference[step].items():
            np.testing.assert_allclose(resumed[step][key], value, rtol=0, atol=0,
                                       err_msg=f"step {step} {key}")
    # The RL-time clock continues across the resumes: positive and increasing at every step.
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rl_time = [json.loads(line)["time/rl_s"] for line in f if '"time/rl_s"' in line]
    assert len(rl_time) == 3 and all(b > a > 0 for a, b in zip(rl_time, rl_time[1:]))


@pytest.mark.slow
def test_two_processes_match_one_process_with_two_devices(tmp_path):
    """jax.distributed on localhost (2 processes x 1 CPU device) trains like one process with 2
    devices: same losses, gradient norms, entropies, rewards and evaluations at every step."""
    one, two = str(tmp_path / "one_process"), str(tmp_path / "two_processes")
    # The smoke run's rewards are all 0 (4 SFT steps teach nothing), so advantages vanish; an
    # entropy bonus keeps the gradient non-zero so the comparison covers real updates. The
    # engine runs on the training mesh in one process but on each host's local devices with two
    # processes; a float32 engine keeps that layout difference out of the recorded log-probs
    # (bf16 inference differs by ~1e-4 between the layouts, which moves the IcePop weights).
    extra = ("--config.rl.loss.entropy_coef=0.01", "--config.precision.dtype=float32")
    # (Keeping the caller's XLA flags, as the launcher does for the two processes.)
    env = {**_env(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
           + " --xla_force_host_platform_device_count=2"}
    proc = subprocess.run(_cmd(one, extra=extra), env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launcher = os.path.join(ROOT, "launch", "multiprocess_localhost.sh")
    proc = subprocess.run(["bash", launcher, "-n", "2", "-d", "1", "--", *_cmd(two, extra=extra)[3:]],
                          env={**_env(), "PYTHON": sys.executable}, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    a, b = _metrics(one), _metrics(two)
    assert sorted(a) == sorted(b)
    for step in a:
        keys = [k for k in ("train/loss", "train/grad_norm", "rl/entropy_all_tokens",
                            "rl/reward_mean", "eval/pass@1") if k in a[step]]
        if step:
            assert a[step]["train/grad_norm"] > 0
        for key in keys:
            np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-4, atol=1e-7,
                                       err_msg=f"step {step} {key}")
