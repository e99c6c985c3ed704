"""distributed: argument/env validation in-process, and the launch/ scripts run for real."""
import os
import subprocess
import sys

import numpy as np
import pytest

from ring_jax.train import distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def clean_env(monkeypatch):
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                 distributed.ENV_PROCESS_ID, distributed.ENV_MODE):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_is_a_no_op(clean_env):
    assert distributed.maybe_initialize() is False
    clean_env.setenv(distributed.ENV_NUM_PROCESSES, "1")
    assert distributed.maybe_initialize() is False
    clean_env.setenv(distributed.ENV_MODE, "off")
    clean_env.setenv(distributed.ENV_NUM_PROCESSES, "4")
    assert distributed.maybe_initialize() is False


@pytest.mark.parametrize("env, kwargs, message", [
    ({distributed.ENV_MODE: "yes"}, {}, "RING_JAX_DISTRIBUTED='yes' is invalid"),
    ({distributed.ENV_NUM_PROCESSES: "two"}, {}, "RING_JAX_NUM_PROCESSES='two' is invalid"),
    ({}, dict(num_processes=2, process_id=0),
     "num_processes=2 needs RING_JAX_COORDINATOR"),
    ({distributed.ENV_NUM_PROCESSES: "2", distributed.ENV_COORDINATOR: "127.0.0.1:1"}, {},
     "num_processes=2 needs RING_JAX_PROCESS_ID"),
    ({}, dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2),
     r"process_id=2 is invalid: must be in \[0, 2\)"),
])
def test_invalid_settings_fail_before_initializing(clean_env, env, kwargs, message):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.maybe_initialize(**kwargs)


def test_single_process_helpers():
    assert distributed.is_main()
    value = {"a": np.arange(3), "b": np.float32(2.5)}
    out = distributed.broadcast_from_main(value)
    np.testing.assert_array_equal(out["a"], value["a"])
    assert distributed.agree(True) is True
    distributed.sync("noop")


def _launch(script, args, tmp_path, module="ring_jax.train.distributed", pythonpath=None):
    env = dict(os.environ, PYTHON=sys.executable, RING_JAX_MODULE=module,
               LOGDIR=str(tmp_path / "logs"))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                 distributed.ENV_PROCESS_ID, distributed.ENV_MODE, "XLA_FLAGS"):
        env.pop(name, None)
    return subprocess.run(["bash", os.path.join(REPO, "launch", script), *args], env=env,
                          capture_output=True, text=True, timeout=180)


def test_multiprocess_localhost_runs_a_two_process_psum(tmp_path):
    result = _launch("multiprocess_localhost.sh", ["-n", "2", "-d", "1"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # Device ids of a 2-process CPU run are 0 and 2048 (process-major): 1 + 2049.
    for i in range(2):
        log = open(tmp_path / "logs" / f"process_{i}.log").read()
        assert (f"process {i}/2 devices local=1 global=2 psum=2050 expected=2050 "
                "broadcast=100 OK") in log, log
    # Process 0's lines also reach the console.
    assert "process 0/2" in result.stdout


def test_multiprocess_localhost_propagates_a_failure(tmp_path):
    result = _launch("multiprocess_localhost.sh", ["-n", "2"], tmp_path,
                     module="ring_jax.no_such_module")
    assert result.returncode != 0
    assert "failed" in result.stderr


def test_local_launcher_single_process(tmp_path):
    result = _launch("local.sh", [], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "process 0/1 devices local=1 global=1 psum=1 expected=1 broadcast=100 OK" in \
        result.stdout


def test_two_process_checkpoint_save_and_restore(tmp_path):
    """Host-local leaves (step, key) and a process-sharded array in one multi-process save."""
    result = _launch("multiprocess_localhost.sh", ["-n", "2", "--", str(tmp_path / "ckpt")],
                     tmp_path, module="multiprocess_checkpoint_prog",
                     pythonpath=os.path.dirname(os.path.abspath(__file__)))
    logs = [open(tmp_path / "logs" / f"process_{i}.log").read() for i in range(2)]
    assert result.returncode == 0, result.stderr + "\n".join(logs)
    for i, log in enumerate(logs):
        assert f"process {i} checkpoint OK" in log, log


def test_slurm_script_runs_two_tasks_with_jax_slurm_detection(tmp_path):
    """launch/slurm_gpu.sbatch with a stand-in srun: JAX finds its peers from SLURM_* alone."""
    env = dict(os.environ, RING_JAX_MODULE="ring_jax.train.distributed", CONFIG="unused",
               WORKDIR=str(tmp_path / "run"), VENV=os.path.dirname(os.path.dirname(
                   sys.executable)), FAKE_SLURM_LOGDIR=str(tmp_path), FAKE_SLURM_NTASKS="2",
               JAX_PLATFORMS="cpu",
               PATH=os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_slurm")
               + os.pathsep + os.environ["PATH"])
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                 distributed.ENV_PROCESS_ID, distributed.ENV_MODE, "XLA_FLAGS"):
        env.pop(name, None)
    result = subprocess.run(["bash", os.path.join(REPO, "launch", "slurm_gpu.sbatch")],
                            env=env, capture_output=True, text=True, timeout=180)
    logs = [open(tmp_path / f"task_{i}.log").read() for i in range(2)]
    assert result.returncode == 0, result.stdout + result.stderr + "\n".join(logs)
    for i, log in enumerate(logs):
        assert f"process {i}/2 devices local=1 global=2 psum=2050" in log and "OK" in log, log


def test_tpu_script_passes_arguments_through_unchanged(tmp_path):
    """launch/tpu_vm.sh run: the remote command gets every argument verbatim (spaces, quotes)."""
    remote_python = tmp_path / "ring_jax" / ".venv" / "bin" / "python"
    remote_python.parent.mkdir(parents=True)
    # The "worker's" python records its environment switch and arguments, one per line.
    remote_python.write_text('#!/usr/bin/env bash\necho "mode=$RING_JAX_DISTRIBUTED" > args.txt\n'
                             'printf "%s\\n" "$@" >> args.txt\n')
    remote_python.chmod(0o755)
    env = dict(os.environ, FAKE_TPU_HOME=str(tmp_path),
               PATH=os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_gcloud")
               + os.pathsep + os.environ["PATH"])
    args = ["--config=experiments/icepop.py:correction=tis,local", "--workdir=gs://b/run 1",
            "--config.name=it's \"quoted\" $HOME"]
    result = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_vm.sh"), "run", "my-tpu",
                             "zone-a", "--", *args], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "ring_jax" / "args.txt").read_text().splitlines()
    assert lines == ["mode=auto", "-m", "ring_jax.main", *args]
    call = (tmp_path / "gcloud_calls.log").read_text()
    assert "compute tpus tpu-vm ssh my-tpu --zone=zone-a --worker=all" in call
