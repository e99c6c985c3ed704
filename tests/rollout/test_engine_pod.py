"""The global-mesh engine across processes (`multihost.EngineMeshConfig(layout="global")`):
2 processes x 4 fake CPU devices, joined by jax.distributed over localhost, generate exactly
what one process with 8 devices generates (fp32): same tokens, log-probs, policy versions and
routed experts, on both processes.

What this proves: the engine's programs partition over a mesh whose devices two controllers
own, every process issues the same programs in the same order (the host loop is a function of
shared state), its outputs reach every host, and the weight sync reshards a process-spanning
trainer layout on device. What it cannot: the collectives here are gloo over loopback, not ICI
or DCN, so it says nothing about speed, and a fake CPU device has no memory limit."""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))


def _env(**extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}:{HERE}", **extra}
    for name in ("RING_JAX_COORDINATOR", "RING_JAX_NUM_PROCESSES", "RING_JAX_PROCESS_ID",
                 "RING_JAX_DISTRIBUTED", "XLA_FLAGS"):
        env.pop(name, None)
    env.update(extra)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("num_slots, cache_spec", [
    (8, "P(('data', 'fsdp', 'expert'), 'tensor', None, None)"),
    # 4 slots: over expert; the cache's length over data, the axis between the two processes.
    (4, "P(('fsdp', 'expert'), 'tensor', 'data', None)"),
])
def test_two_process_global_engine_matches_one_process_with_eight_devices(tmp_path, num_slots,
                                                                          cache_spec):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "engine_pod_prog", str(one), str(num_slots)], cwd=ROOT,
        capture_output=True,
        text=True, timeout=900,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "multiprocess_localhost.sh"), "-n", "2", "-d", "4",
         "--", str(two), str(num_slots)], cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=_env(PYTHON=sys.executable, RING_JAX_MODULE="engine_pod_prog",
                 LOGDIR=str(tmp_path / "logs")))
    logs = [open(tmp_path / "logs" / f"process_{i}.log").read()[-2000:] for i in range(2)]
    assert proc.returncode == 0, proc.stderr[-3000:] + "\n".join(logs)
    want = np.load(one / "process_0.npz")
    assert list(want["mesh"]) == [2, 1, 4, 1]  # (data, fsdp, expert, tensor)
    assert str(want["cache_spec"]) == cache_spec
    assert len([k for k in want if k.endswith("/tokens")]) == 11
    # Both policy versions were used (the sync happened mid-flight).
    versions = np.concatenate([want[k] for k in want if k.endswith("/versions")])
    assert set(versions.tolist()) == {0, 1}
    for i in range(2):
        got = np.load(two / f"process_{i}.npz")
        assert sorted(got.keys()) == sorted(want.keys())
        for key in want:
            # Bitwise: the same fp32 programs on the same mesh; a wrong shard, a stale weight
            # or an out-of-order program changes tokens, not just the last bits.
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"process {i} {key}")
