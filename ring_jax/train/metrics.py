"""Metric writers: JSONL (the record plots read), TensorBoard, and the console progress line.

    writer = MetricsWriter(workdir, resume_step=restored_step, total_steps=cfg.num_steps)
    writer.write(step, {"rl/reward_mean": 0.5, "perf/tokens_per_s": 900.0})
    writer.close()

workdir/metrics.jsonl holds one JSON object per `write` call: {"step", "time/elapsed_s",
"time/unix", **metrics}. `time/elapsed_s` is wall time since the run began, continued across
restarts, so curves against wall-clock stay monotone after a resume.

Resuming: the loop restores a checkpoint of step s and runs steps s+1, ... again. Lines the
killed process wrote for steps > s are dropped first (and a half-written last line), so the
file reads as if the run had never stopped. For that to hold, the loop writes a step's metrics
before it saves that step's checkpoint. TensorBoard gets the same treatment via `purge_step`.

Only the main process writes (`is_main` defaults to `jax.process_index() == 0`); on the other
processes every method is a no-op.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import time
from typing import Any, Mapping

import numpy as np

from ring_jax.train import progress as progress_lib

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
TENSORBOARD_DIR = "tensorboard"


def _to_jsonable(value: Any) -> Any:
    """Scalars (python, numpy, 0-d jax arrays) -> float/int/bool; arrays -> nested lists
    (kept in the JSONL, skipped by TensorBoard); strings and None unchanged."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        array = np.asarray(value)
        return _to_jsonable(array.item()) if array.ndim == 0 else array.tolist()
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    return value


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (killed mid-write) is skipped."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def truncate_jsonl(path: str | os.PathLike, keep_through_step: int | None) -> list[dict]:
    """Rewrites `path` keeping records with step <= keep_through_step (None: keep none).

    The rewrite goes through a temporary file and a rename, so a kill during it leaves either
    the old or the new file. Returns the kept records.
    """
    records = read_jsonl(path)
    kept = [] if keep_through_step is None else [
        r for r in records if r.get("step", math.inf) <= keep_through_step]
    if os.path.exists(path):
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return kept


def _config_to_dict(config: Any) -> Any:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: _config_to_dict(getattr(config, f.name))
                for f in dataclasses.fields(config)}
    if hasattr(config, "to_dict"):   # ml_collections.ConfigDict
        return _config_to_dict(config.to_dict())
    if isinstance(config, Mapping):
        return {str(k): _config_to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [_config_to_dict(v) for v in config]
    return _to_jsonable(config)


def config_as_json(config: Any) -> dict:
    """The JSON value config.json holds for `config` (dataclass, ConfigDict or dict): tuples
    become lists, unknown objects their str."""
    return json.loads(json.dumps(_config_to_dict(config), default=str))


def write_config_json(workdir: str | os.PathLike, config: Any) -> str:
    """Writes workdir/config.json (dataclass, ConfigDict or dict; sorted keys), atomically.
    Returns the path. A resumed run records its config through
    `ring_jax.train.config_history.record`, which validates before it writes."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(config_as_json(config), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


class JsonlWriter:
    """Appends one JSON line per step to workdir/metrics.jsonl (after the resume truncation)."""

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None,
                 clock=time.time):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        kept = truncate_jsonl(self.path, resume_step)
        self._clock = clock
        previous = max((r.get("time/elapsed_s", 0.0) for r in kept), default=0.0)
        # Elapsed time continues from the last kept record, not from the killed process's end.
        self._origin = clock() - previous
        self._file = open(self.path, "a")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        now = self._clock()
        record = {"step": int(step), "time/elapsed_s": now - self._origin, "time/unix": now}
        record.update({k: _to_jsonable(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardWriter:
    """Scalars to workdir/tensorboard; events after the resume step are purged on resume.

    TensorBoard tags allow only [A-Za-z0-9_./-]; tensorboardX replaces other characters with
    '_' ("eval/pass@1" shows as "eval/pass_1").
    """

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None):
        from tensorboardX import SummaryWriter
        purge_step = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(logdir=os.path.join(workdir, TENSORBOARD_DIR),
                                     purge_step=purge_step)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        for name, value in metrics.items():
            value = _to_jsonable(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(name, value, global_step=int(step))
            elif isinstance(value, bool):
                self._writer.add_scalar(name, float(value), global_step=int(step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsWriter:
    """Fans one `write(step, metrics)` out to JSONL, TensorBoard and the console line."""

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None,
                 total_steps: int | None = None, tensorboard: bool = True,
                 console_every: int = 1, console_fields: Mapping[str, str] | None = None,
                 is_main: bool | None = None):
        if is_main is None:
            import jax
            is_main = jax.process_index() == 0
        self.is_main = is_main
        self._writers: list[Any] = []
        self.progress: progress_lib.ProgressLine | None = None
        if not is_main:
            return
        self._writers.append(JsonlWriter(workdir, resume_step=resume_step))
        if tensorboard:
            self._writers.append(TensorBoardWriter(workdir, resume_step=resume_step))
        if console_every > 0:
            self.progress = progress_lib.ProgressLine(
                total_steps, start_step=resume_step or 0, every=console_every,
                fields=console_fields or progress_lib.DEFAULT_FIELDS)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.is_main:
            return
        metrics = {k: _to_jsonable(v) for k, v in metrics.items()}
        for writer in self._writers:
            writer.write(step, metrics)
        if self.progress is not None:
            self.progress.update(step, metrics)

    def flush(self) -> None:
        for writer in self._writers:
            if hasattr(writer, "flush"):
                writer.flush()

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers = []

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
