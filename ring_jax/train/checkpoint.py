"""Checkpoints as one consistent cut: train state, JSON state and host numpy buffers.

A thin wrapper over orbax's `CheckpointManager` with three items per step:

  state   a pytree of jax arrays (params, optimizer state, router bias, step, RNG key), saved
          sharded and restored onto whatever shardings the caller's target asks for, so a run
          can resume on a different mesh.
  meta    a JSON-able dict (scheduler counters, the prompt iterator's position, the config).
  arrays  a nested dict of host numpy arrays, where a leaf may also be a *list* of arrays of
          different shapes (the C3PO++ buffer: one token array per unfinished response).

Orbax writes each step into a temporary directory and renames it only after every item is
written, so a crash or SIGKILL mid-save leaves the previous step as the latest complete one.
Saves are asynchronous: `save` returns once device arrays are copied to host; `wait()` blocks
until the write is committed.

Multi-process runs: every process calls `save`/`restore` with the same arguments; each writes
its own shards, process 0 the JSON and numpy items. Leaves living on a single local device (a
step counter from `jnp.asarray`, a key from `jax.random.key`) are stored as replicated global
arrays and restored back onto the local device the target names.

Retention keeps the newest `max_to_keep` steps plus the `keep_best` steps with the best value of
`best_metric` among steps saved with metrics, plus the newest step saved with a finite state (so
a run that went NaN never rotates out the last good checkpoint).

Integrity (`ring_jax.train.integrity`): every save records per-array checksums of the state and
the `arrays` item, and whether the state was finite; `restore()` checks them. When the latest
step is damaged (a checksum mismatch, a truncated array file or `meta/metadata`, an empty step
directory), restore warns in one line naming the damaged path, moves that directory aside to
`<step>.damaged` (so the run can save that step again; the bytes stay for inspection) and takes
the newest intact step; only when no step is intact does it raise `DamagedCheckpointError`,
naming every path tried and why. A target whose tree or shapes differ from the saved state (a
different model or optimizer) raises `CheckpointMismatchError` instead: that is not damage.
Checkpoints written before integrity data existed (format 1) restore unverified. A full disk
raises `DiskFullError`: one line with the path and the free space, instead of orbax's
per-thread tracebacks. Setting damaged steps aside renames local directories (os.rename).

Encoding of `arrays` (orbax refuses zero-size arrays, and a ragged list has no single shape):
every leaf is raveled and stored as one 1-D array with a single trailing pad element; a list
leaf is stored as the concatenation of its raveled members (+ the pad). The shapes and dtypes
needed to cut and reshape them back live in the `meta` item under `_arrays_manifest`, so restore
needs no target for this item.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import shutil
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from ring_jax import config as config_lib
from ring_jax.train import integrity

_MANIFEST_KEY = "_arrays_manifest"
_ITEMS = ("state", "meta", "arrays")
# Version 2 adds the integrity record (meta) and the meta digest (arrays); version 1
# checkpoints still restore, unverified.
_FORMAT_KEY, _FORMAT_VERSION = "_format", 2
_RESERVED_META_KEYS = (_MANIFEST_KEY, integrity.INTEGRITY_KEY)
DAMAGED_SUFFIX = ".damaged"

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or restored; the message says which path and why."""


class DamagedCheckpointError(CheckpointError):
    """No intact checkpoint to restore (every path tried is named in the message)."""


class CheckpointMismatchError(CheckpointError):
    """The saved state's tree or shapes differ from the state the caller asked for."""


class DiskFullError(CheckpointError):
    """The filesystem holding the checkpoints ran out of space."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """save_every: steps between periodic saves (the loop also saves at the end).
    max_to_keep: newest checkpoints kept.
    best_metric: metric name passed to `save(metrics=...)` ranking checkpoints ("" = off).
    best_mode: "max" or "min" — which direction of `best_metric` is better.
    keep_best: checkpoints kept for being best (in addition to the newest ones).
    async_save: write in a background thread.
    max_nonfinite_steps: consecutive steps with a non-finite loss or state after which a
      training loop stops with an error, before saving that step.
    """
    save_every: int = 100
    max_to_keep: int = 2
    best_metric: str = ""
    best_mode: str = "max"
    keep_best: int = 1
    async_save: bool = True
    max_nonfinite_steps: int = 3

    def __post_init__(self):
        config_lib.check_int("save_every", self.save_every, min_value=1)
        config_lib.check_int("max_to_keep", self.max_to_keep, min_value=1)
        config_lib.check(isinstance(self.best_metric, str), "best_metric", self.best_metric,
                         "must be a metric name (str), '' to disable")
        config_lib.check_one_of("best_mode", self.best_mode, ("max", "min"))
        config_lib.check_int("keep_best", self.keep_best, min_value=0)
        config_lib.check(isinstance(self.async_save, bool), "async_save", self.async_save,
                         "must be a bool")
        config_lib.check_int("max_nonfinite_steps", self.max_nonfinite_steps, min_value=1)


@dataclasses.dataclass
class Restored:
    """One restored checkpoint: the step, the state pytree (on the target shardings), the
    JSON dict and the numpy arrays dict (lists restored as lists)."""
    step: int
    state: Any
    meta: dict
    arrays: dict


def _is_key(x: Any) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key)


def _replicated_sharding() -> jax.sharding.NamedSharding:
    """Replicated over every device of every process."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _is_host_local(x: Any) -> bool:
    """A multi-process run cannot save or restore an array that lives on one local device
    (a step counter made with jnp.asarray, a key from jax.random.key): orbax needs global
    arrays. Such leaves are treated as replicated (every process holds the same value)."""
    sharding = getattr(x, "sharding", None)
    return jax.process_count() > 1 and (
        sharding is None or isinstance(sharding, jax.sharding.SingleDeviceSharding))


def _keys_to_data(state: Any) -> Any:
    """Typed PRNG keys are stored as their raw uint32 key data (orbax has no key dtype);
    host-local arrays of a multi-process run become replicated global arrays."""

    def leaf(x):
        if _is_key(x):
            x = jax.random.key_data(x)
        if isinstance(x, jax.Array) and _is_host_local(x):
            x = jax.make_array_from_process_local_data(_replicated_sharding(), np.asarray(x))
        return x

    return jax.tree.map(leaf, state)


def _abstract_target(state_target: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for every array leaf; keys become their key data."""

    def leaf(x):
        if _is_key(x):
            data = jax.eval_shape(jax.random.key_data, x)
            sharding = getattr(x, "sharding", None)
            if not isinstance(sharding, (jax.sharding.NamedSharding,
                                         jax.sharding.SingleDeviceSharding)):
                sharding = None
            # A NamedSharding's spec leaves the trailing key-data axis unsharded.
            x = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
        if isinstance(x, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)):
            sharding = getattr(x, "sharding", None)
            if _is_host_local(x):
                sharding = _replicated_sharding()
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return x

    return jax.tree.map(leaf, state_target)


def _to_target(restored: Any, state_target: Any) -> Any:
    """Undoes the storage forms: key data -> typed keys; replicated global arrays of a
    multi-process run -> back onto the target's local device (as the caller asked)."""

    def leaf(r, t):
        if isinstance(r, jax.Array) and _is_host_local(t):
            local = r.addressable_data(0)
            sharding = getattr(t, "sharding", None)
            r = jax.device_put(local, sharding) if sharding is not None else local
        if _is_key(t):
            r = jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
        return r

    return jax.tree.map(leaf, restored, state_target)


def encode_arrays(arrays: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    """Flattens a nested dict of numpy arrays / lists of arrays to 1-D padded arrays + manifest.

    Keys of the flat dict join the nested keys with '/'. The manifest records, per flat key,
    the dtype and either the shape ("array") or every member's shape ("ragged").
    """
    flat, manifest = {}, {}

    def visit(prefix: str, node: Any):
        if isinstance(node, Mapping):
            for k, v in node.items():
                if not isinstance(k, str) or "/" in k or not k or k == _FORMAT_KEY:
                    raise ValueError(f"arrays keys must be non-empty str without '/' (and not "
                                     f"{_FORMAT_KEY!r}): {k!r}")
                visit(f"{prefix}/{k}" if prefix else k, v)
        elif isinstance(node, (list, tuple)):
            members = [np.asarray(m) for m in node]
            dtypes = {m.dtype for m in members}
            if len(dtypes) > 1:
                raise ValueError(f"arrays[{prefix!r}]: ragged members mix dtypes {dtypes}")
            dtype = members[0].dtype if members else np.dtype(np.float32)
            values = [m.ravel() for m in members] + [np.zeros((1,), dtype)]
            flat[prefix] = np.concatenate(values)
            manifest[prefix] = {"kind": "ragged", "dtype": dtype.str,
                                "shapes": [list(m.shape) for m in members]}
        else:
            array = np.asarray(node)
            flat[prefix] = np.concatenate([array.ravel(), np.zeros((1,), array.dtype)])
            manifest[prefix] = {"kind": "array", "dtype": array.dtype.str,
                                "shape": list(array.shape)}

    visit("", arrays)
    return flat, manifest


def decode_arrays(flat: Mapping[str, np.ndarray], manifest: Mapping[str, dict]) -> dict:
    """Inverse of `encode_arrays`: the nested dict with arrays and lists of arrays."""
    out: dict = {}
    for name, entry in manifest.items():
        data = np.asarray(flat[name]).astype(np.dtype(entry["dtype"]), copy=False)
        if entry["kind"] == "array":
            shape = tuple(entry["shape"])
            value: Any = data[:int(np.prod(shape))].reshape(shape)
        else:
            value, start = [], 0
            for shape in entry["shapes"]:
                size = int(np.prod(shape))
                value.append(data[start:start + size].reshape(shape).copy())
                start += size
        node = out
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


class _Damaged(Exception):
    """One step failed to restore or verify (internal: restore falls back to an older step)."""


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    text = text.split(" See full TensorStore details")[0]   # a bound-method repr follows
    return text if len(text) <= limit else text[:limit] + "..."


def _is_disk_full(e: BaseException | None) -> bool:
    """Whether ENOSPC is anywhere in the exception's chain (orbax wraps it several times)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or \
                "No space left on device" in str(e):
            return True
        if isinstance(e, BaseExceptionGroup) and any(_is_disk_full(x) for x in e.exceptions):
            return True
        e = e.__cause__ or e.__context__
    return False


def _free_space(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    free, unit = float(shutil.disk_usage(path).free), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if free < 1024:
            break
        free, unit = free / 1024, larger
    return f"{free:.1f} {unit}"


_THREAD_JOIN_TIMEOUT_S = 30.0


def _join_orbax_threads_started_since(threads_before: set[threading.Thread], *,
                                      timeout_s: float) -> None:
    """Waits (at most `timeout_s` in all) for the orbax threads (its own `Thread` subclasses,
    not executor workers, which live on) not in `threads_before` to end."""
    deadline = time.monotonic() + timeout_s
    for thread in set(threading.enumerate()) - threads_before:
        if type(thread).__module__.startswith("orbax."):
            thread.join(max(0.0, deadline - time.monotonic()))


class _DropOrbaxDiskFullLogs(logging.Filter):
    """orbax logs a full disk from each of its background threads with a traceback (hundreds
    of lines); `DiskFullError` says it once instead, so those records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        error = record.exc_info[1] if record.exc_info else None
        return not (_is_disk_full(error) or "No space left on device" in record.getMessage())


_DISK_FULL_FILTER = _DropOrbaxDiskFullLogs()


@dataclasses.dataclass
class _KeepNewestFinite:
    """Preservation policy: keep the newest step whose state was saved finite, whatever the
    other policies say (a run that went NaN never rotates out the last good checkpoint)."""
    is_finite: Callable[[int], bool]

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        flags = [False] * len(checkpoints)
        for i in sorted(range(len(checkpoints)), key=lambda i: -checkpoints[i].step):
            if self.is_finite(checkpoints[i].step):
                flags[i] = True
                break
        return flags


class Checkpointer:
    """Saves and restores consistent cuts of a run under `directory` (e.g. workdir/checkpoints).

    All processes of a multi-process run call `save` and `restore` with the same arguments
    (orbax writes each process's shards; JSON and numpy items are written by process 0).
    """

    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig = CheckpointConfig()):
        self.cfg = cfg
        self.directory = os.path.abspath(os.fspath(directory))
        self._finite: dict[int, bool] = {}   # step -> saved finite (read lazily from meta)
        self._failed = False   # a save failed: close() must not raise the same error again
        policies = [checkpoint_managers.LatestN(n=cfg.max_to_keep),
                    _KeepNewestFinite(self._step_is_finite)]
        best_fn = None
        if cfg.best_metric:
            best_fn = lambda metrics: float(metrics[cfg.best_metric])
            policies.append(checkpoint_managers.BestN(
                get_metric_fn=best_fn, reverse=(cfg.best_mode == "min"), n=cfg.keep_best,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=best_fn, best_mode=cfg.best_mode,
            enable_async_checkpointing=cfg.async_save,
            # Leftover tmp dirs of a killed save are removed when the manager starts.
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, item_names=_ITEMS, options=options)
        logging.getLogger("absl").addFilter(_DISK_FULL_FILTER)   # idempotent

    def due(self, step: int) -> bool:
        """Whether the periodic schedule asks for a save at `step`."""
        return step > 0 and step % self.cfg.save_every == 0

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    @contextlib.contextmanager
    def _disk_errors(self) -> Iterator[None]:
        """Turns orbax's many-times-wrapped ENOSPC into one `DiskFullError` line.

        A failed save can leave orbax threads it started still running (a metadata writer
        waiting on the failed commits); if the process then exits, they fail against the
        interpreter's shut-down executors and print their own tracebacks. They are joined
        before the error is raised, so the error is the last thing the save does.
        """
        threads_before = set(threading.enumerate())
        try:
            yield
        except Exception as e:
            if not _is_disk_full(e):
                raise
            self._failed = True
            _join_orbax_threads_started_since(threads_before, timeout_s=_THREAD_JOIN_TIMEOUT_S)
            raise DiskFullError(f"no space left on device writing checkpoints under "
                                f"{self.directory} ({_free_space(self.directory)} free)") from None

    def save(self, step: int, *, state: Any, meta: Mapping[str, Any] | None = None,
             arrays: Mapping[str, Any] | None = None,
             metrics: Mapping[str, float] | None = None) -> None:
        """Starts saving one cut at `step` (returns before the write finishes when async).

        metrics: values used for best-checkpoint retention; steps saved without them are kept
          only while they are among the newest `max_to_keep`.
        """
        flat, manifest = encode_arrays(arrays or {})
        # orbax refuses an empty item; the version marker also keeps `arrays` readable later.
        flat[_FORMAT_KEY] = np.array([_FORMAT_VERSION], np.int32)
        meta = dict(meta or {})
        for key in _RESERVED_META_KEYS:
            if key in meta:
                raise ValueError(f"meta key {key!r} is reserved")
        meta[_MANIFEST_KEY] = manifest
        # An empty dict (a step without evaluation) is "no metrics", not a missing metric.
        metrics = {k: float(v) for k, v in metrics.items()} if metrics else None
        if self.cfg.best_metric and metrics is not None and self.cfg.best_metric not in metrics:
            raise KeyError(f"metrics passed to save lack best_metric={self.cfg.best_metric!r}")
        stored = _keys_to_data(state)
        state_record, finite = integrity.summarise_state(stored)
        meta[integrity.INTEGRITY_KEY] = {
            "state": state_record, "finite": finite,
            "arrays": {k: integrity.sha256_array(v) for k, v in flat.items()}}
        # Stored in `arrays`, checked against `meta` on restore: each item vouches for another.
        flat[integrity.META_DIGEST_KEY] = integrity.digest_to_array(integrity.sha256_json(meta))
        self._finite[step] = finite
        with self._disk_errors():
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.PyTreeSave(stored),
                                        meta=ocp.args.JsonSave(meta),
                                        arrays=ocp.args.PyTreeSave(flat)),
                metrics=metrics, force=True)
        if not saved:
            raise CheckpointError(f"orbax declined to save step {step} under {self.directory}")

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best `best_metric` (the latest step when best tracking is off)."""
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def _read_meta_and_arrays(self, step: int) -> tuple[dict, dict]:
        """The `meta` and `arrays` items of `step`, verified against each other."""
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore(), arrays=ocp.args.PyTreeRestore()))
            meta, flat = dict(restored["meta"]), dict(restored["arrays"])
        except Exception as e:   # any read error of a step is damage: try an older step
            raise _Damaged(f"meta/arrays unreadable: {_first_line(e)}") from e
        if integrity.INTEGRITY_KEY not in meta:
            if int(np.asarray(flat.get(_FORMAT_KEY, [1]))[0]) >= 2:
                raise _Damaged("meta lacks its integrity record")
            return meta, flat   # format 1: written before integrity data existed
        digest = flat.pop(integrity.META_DIGEST_KEY, None)
        if digest is None or integrity.array_to_digest(digest) != integrity.sha256_json(meta):
            raise _Damaged("meta checksum mismatch")
        expected = meta[integrity.INTEGRITY_KEY]["arrays"]
        bad = sorted(k for k in expected if k not in flat
                     or integrity.sha256_array(np.asarray(flat[k])) != expected[k])
        if bad:
            raise _Damaged(f"arrays checksum mismatch: {', '.join(bad)}")
        return meta, flat

    def _step_is_finite(self, step: int) -> bool:
        if step not in self._finite:
            try:
                record = self._read_meta_and_arrays(step)[0].get(integrity.INTEGRITY_KEY)
                # Format 1 recorded nothing: it counts as finite (it was kept before too).
                self._finite[step] = record["finite"] if record else True
            except _Damaged:
                self._finite[step] = False
        return self._finite[step]

    def _restore_step(self, step: int, state_target: Any, partial: bool) -> Restored:
        """Restores and verifies one step; raises `_Damaged` when it is not intact."""
        meta, flat = self._read_meta_and_arrays(step)
        record = meta.pop(integrity.INTEGRITY_KEY, None)
        abstract = _abstract_target(state_target)
        if record is not None:
            problems = integrity.check_structure(record["state"], abstract, partial)
            if problems:
                raise CheckpointMismatchError(
                    f"{self.step_path(step)} holds a different state than this run builds "
                    f"(another model or optimizer config?): {'; '.join(problems[:5])}"
                    + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=abstract,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                    partial_restore=partial)))
        except Exception as e:
            raise _Damaged(f"state unreadable: {_first_line(e)}") from e
        if record is not None:
            problems = integrity.check_state(record["state"], restored["state"])
            if problems:
                raise _Damaged("; ".join(problems[:3])
                               + (f"; and {len(problems) - 3} more" if len(problems) > 3 else ""))
            if not record["finite"]:
                log.warning("checkpoint %s was saved with non-finite values",
                            self.step_path(step))
        manifest = meta.pop(_MANIFEST_KEY)
        arrays = decode_arrays(flat, manifest)
        state = _to_target(restored["state"], state_target)
        return Restored(step=step, state=state, meta=meta, arrays=arrays)

    def _set_aside(self, steps: Sequence[int]) -> list[str]:
        """Renames damaged step directories to `<step>.damaged[.k]` (process 0; every process
        waits for it) so orbax no longer lists them and the step can be saved again."""
        moved = []
        for step in steps:
            src, dst, k = self.step_path(step), self.step_path(step) + DAMAGED_SUFFIX, 1
            while os.path.exists(dst):
                dst, k = f"{self.step_path(step)}{DAMAGED_SUFFIX}.{k}", k + 1
            moved.append(dst)
            if jax.process_index() == 0 and os.path.exists(src):
                os.rename(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("ring_jax_checkpoint_set_aside")
        self._manager.reload()
        return moved

    def restore(self, state_target: Any, step: int | None = None, *,
                partial: bool = False, read_only: bool = False) -> Restored:
        """Restores `step` (default: the newest intact step) placed like `state_target`.

        state_target: a pytree matching the saved state whose array leaves are arrays or
          `jax.ShapeDtypeStruct`s carrying the wanted sharding (and dtype: a cast happens on
          load); typed PRNG keys are rebuilt from their key data with the target's impl.
        partial: `state_target` may name a subset of the saved state's dict keys (e.g. only
          {"params", "router"} to initialise RL from an SFT run); the rest is not read.

        read_only: never rename anything under the directory (reading another run's
          checkpoints, e.g. to initialise from them).

        Without `step`, damaged steps newer than the intact one restored are set aside (module
        docstring; skipped in place when `read_only`) with a one-line warning each; an explicit
        damaged `step` raises.
        """
        self.wait()   # a save of this manager still in flight is part of what we may read
        candidates = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not candidates:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        damaged: list[tuple[int, str]] = []
        for candidate in candidates:
            try:
                restored = self._restore_step(candidate, state_target, partial)
            except _Damaged as e:
                damaged.append((candidate, str(e)))
                continue
            if damaged and read_only:
                for s, reason in damaged:
                    log.warning("checkpoint %s is damaged (%s): skipped; restoring step %d "
                                "instead", self.step_path(s), reason, candidate)
            elif damaged:
                moved = self._set_aside([s for s, _ in damaged])
                for (s, reason), dst in zip(damaged, moved):
                    log.warning("checkpoint %s is damaged (%s): moved to %s; restoring step %d "
                                "instead", self.step_path(s), reason, dst, candidate)
            return restored
        raise DamagedCheckpointError(
            "no intact checkpoint to restore; tried " + "; ".join(
                f"{self.step_path(s)} ({reason})" for s, reason in damaged))

    def wait(self) -> None:
        """Blocks until every started save is committed to disk."""
        with self._disk_errors():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's threads. Call on exit. A full disk
        already reported by `save`/`wait` is not raised a second time."""
        already_reported = self._failed
        try:
            with self._disk_errors():
                self._manager.close()
        except DiskFullError:
            if not already_reported:
                raise

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
