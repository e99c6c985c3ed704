"""Save mid-run, restore in a fresh process: the continued schedule equals the uninterrupted."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from ring_jax.scheduler import testing

_WORKER = pathlib.Path(__file__).with_name("restore_worker.py")
_spec = importlib.util.spec_from_file_location("restore_worker", _WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

_REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", ["sync", "c3po", "paced", "async"])
def test_restore_in_fresh_process_continues_identically(mode, tmp_path):
    with worker.build(mode) as sched:
        reference = testing.run_training(sched)
        reference_totals = sched.pop_metrics()
    assert len(reference) >= 5
    if mode == "c3po":  # the cut must fall while responses sit in the buffer
        assert reference_totals["sched/total/carried_responses"] > 0
        assert reference_totals["sched/total/purged_responses"] > 0
    if mode == "paced":  # same σ_max = 1: carried work, and nothing purged
        assert reference_totals["sched/total/carried_responses"] > 0
        assert reference_totals["sched/total/purged_responses"] == 0

    cut = 3
    with worker.build(mode) as sched:
        head = testing.run_training(sched, max_batches=cut)
        state = sched.state_dict()
    np.savez(tmp_path / "state.npz", **state)
    env = dict(os.environ, PYTHONPATH=str(_REPO), JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, str(_WORKER), mode, str(tmp_path / "state.npz"),
                    str(tmp_path / "out.npz")], check=True, env=env, timeout=120)
    with np.load(tmp_path / "out.npz") as f:
        tail = [{k.split("/", 1)[1]: f[k] for k in f.files if k.startswith(f"{i}/")}
                for i in range(int(f["num_batches"]))]

    _assert_same_batches(head + tail, reference)


def _assert_same_batches(continued, reference):
    assert len(continued) == len(reference)
    for i, (a, b) in enumerate(zip(continued, reference)):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"batch {i} {k}")


def test_async_cut_while_the_producer_sleeps_through_publishes(tmp_path):
    """The trainer publishes the version the idle producer waits for, takes a ready batch,
    publishes again and cuts, all before the producer wakes (under the scheduler's lock): the
    cut must still wait until the producer has installed the version it waited for, or a
    restored process (which re-publishes only the newest version) generates with a newer one."""
    with worker.build("async") as sched:
        reference = testing.run_training(sched)

    with worker.build("async") as sched:
        head = testing.run_training(sched, max_batches=1)
        sched.state_dict()  # returns once the producer waits for the next version
        with sched.cond:  # two batches and publishes with no chance for the producer to wake
            head += testing.run_training(sched, max_batches=2)
            state = sched.state_dict()
    np.savez(tmp_path / "state.npz", **state)
    env = dict(os.environ, PYTHONPATH=str(_REPO), JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, str(_WORKER), "async", str(tmp_path / "state.npz"),
                    str(tmp_path / "out.npz")], check=True, env=env, timeout=120)
    with np.load(tmp_path / "out.npz") as f:
        tail = [{k.split("/", 1)[1]: f[k] for k in f.files if k.startswith(f"{i}/")}
                for i in range(int(f["num_batches"]))]
    _assert_same_batches(head + tail, reference)
