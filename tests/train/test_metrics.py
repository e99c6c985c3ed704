"""Metric writers: JSONL resume truncation, elapsed time across restarts, TensorBoard, config."""
import dataclasses
import io
import json
import os
import struct

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ring_jax.train import metrics as metrics_lib
from ring_jax.train import progress


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_jsonl_resume_drops_steps_after_restored_step(tmp_path):
    clock = FakeClock()
    writer = metrics_lib.JsonlWriter(tmp_path, clock=clock)
    for step in range(1, 6):
        clock.t += 10
        writer.write(step, {"rl/reward_mean": jnp.float32(step / 10), "n": np.int64(step),
                            "moe/load": jnp.arange(4).reshape(2, 2), "note": "x"})
    writer.close()
    # A kill mid-write leaves a torn line; it must not break the resume.
    with open(tmp_path / metrics_lib.METRICS_FILE, "a") as f:
        f.write('{"step": 6, "rl/rew')

    clock.t += 1000   # downtime between the kill and the restart
    writer = metrics_lib.JsonlWriter(tmp_path, resume_step=3, clock=clock)
    clock.t += 10
    writer.write(4, {"rl/reward_mean": 0.4})
    writer.close()
    records = metrics_lib.read_jsonl(tmp_path / metrics_lib.METRICS_FILE)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["n"] == 1 and isinstance(records[0]["n"], int)
    assert records[0]["moe/load"] == [[0, 1], [2, 3]] and records[0]["note"] == "x"
    assert records[2]["rl/reward_mean"] == pytest.approx(0.3)
    # Elapsed continues from step 3's 30 s, not from the killed process's 50 s or the downtime.
    assert [r["time/elapsed_s"] for r in records] == [10.0, 20.0, 30.0, 40.0]


def test_fresh_run_in_old_workdir_starts_a_new_file(tmp_path):
    writer = metrics_lib.JsonlWriter(tmp_path)
    writer.write(1, {"a": 1.0})
    writer.close()
    writer = metrics_lib.JsonlWriter(tmp_path, resume_step=None)
    writer.write(1, {"a": 2.0})
    writer.close()
    assert [r["a"] for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")] == [2.0]


def _tb_scalars(logdir):
    """Reads scalar events back (TFRecord framing: u64 length, u32 crc, payload, u32 crc)."""
    from tensorboardX.proto import event_pb2
    scalars = {}
    for name in sorted(os.listdir(logdir)):
        data = open(os.path.join(logdir, name), "rb").read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_metrics_writer_fans_out(tmp_path):
    stream = io.StringIO()
    writer = metrics_lib.MetricsWriter(tmp_path, total_steps=4, console_every=2)
    writer.progress.stream = stream
    for step in range(1, 5):
        metrics = {"rl/reward_mean": step / 4, "perf/tokens_per_s": 1500.0,
                   "moe/load": np.ones((2, 3))}   # not a scalar: JSONL only
        if step == 2:
            metrics["eval/pass@1"] = 0.75
        writer.write(step, metrics)
    writer.close()
    records = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2   # steps 2 and 4
    assert "reward 0.500" in lines[0] and "eval 0.750" in lines[0] and "tok/s 1500" in lines[0]
    # Evaluation is not re-run at step 4: the line keeps its last value.
    assert lines[1].startswith("step 4/4 [####################] 100%")
    assert "eval 0.750" in lines[1] and "reward 1" in lines[1]
    scalars = _tb_scalars(tmp_path / metrics_lib.TENSORBOARD_DIR)
    assert scalars["rl/reward_mean"] == [(1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)]
    assert "moe/load" not in scalars
    # TensorBoard tags allow [A-Za-z0-9_./-]: tensorboardX writes "pass@1" as "pass_1".
    assert scalars["eval/pass_1"] == [(2, 0.75)]


def test_non_main_process_writes_nothing(tmp_path):
    writer = metrics_lib.MetricsWriter(tmp_path / "w", is_main=False)
    writer.write(1, {"a": 1.0})
    writer.close()
    assert not os.path.exists(tmp_path / "w")


@dataclasses.dataclass(frozen=True)
class _Inner:
    alpha: float = 0.5
    names: tuple = ("a", "b")


@dataclasses.dataclass(frozen=True)
class _Outer:
    inner: _Inner = _Inner()
    steps: int = 3


def test_write_config_json_dataclass_and_configdict(tmp_path):
    path = metrics_lib.write_config_json(tmp_path / "a", _Outer())
    assert json.load(open(path)) == {"inner": {"alpha": 0.5, "names": ["a", "b"]}, "steps": 3}
    cd = ml_collections.ConfigDict({"rl": {"icepop": {"alpha": 0.5}}, "seed": 1})
    path = metrics_lib.write_config_json(tmp_path / "b", cd)
    assert json.load(open(path)) == {"rl": {"icepop": {"alpha": 0.5}}, "seed": 1}


def test_progress_line_eta_and_formatting():
    clock = FakeClock(0.0)
    line = progress.ProgressLine(100, start_step=50, clock=clock, bar_width=10,
                                 fields={"reward": "r"})
    clock.t = 20.0   # 10 steps in 20 s -> 2 s/step, 40 steps left -> 80 s
    text = line.line(60, {"r": 0.12345})
    assert text == "step  60/100 [######----]  60% | reward 0.123 | 2.00 s/step | ETA 1m20s"
    assert progress.format_duration(4000) == "1h06m40s"
    assert [progress.format_value(v) for v in (0.0, 1234567.0, 23456.0, 512.4, 12.34, 1.5,
                                                0.00012, float("nan"))] == [
        "0", "1.2M", "23.5k", "512", "12.3", "1.5", "1.2e-04", "nan"]
