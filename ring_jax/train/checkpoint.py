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
`best_metric` among steps saved with metrics.

Encoding of `arrays` (orbax refuses zero-size arrays, and a ragged list has no single shape):
every leaf is raveled and stored as one 1-D array with a single trailing pad element; a list
leaf is stored as the concatenation of its raveled members (+ the pad). The shapes and dtypes
needed to cut and reshape them back live in the `meta` item under `_arrays_manifest`, so restore
needs no target for this item.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from ring_jax import config as config_lib

_MANIFEST_KEY = "_arrays_manifest"
_ITEMS = ("state", "meta", "arrays")
_FORMAT_KEY, _FORMAT_VERSION = "_format", 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """save_every: steps between periodic saves (the loop also saves at the end).
    max_to_keep: newest checkpoints kept.
    best_metric: metric name passed to `save(metrics=...)` ranking checkpoints ("" = off).
    best_mode: "max" or "min" — which direction of `best_metric` is better.
    keep_best: checkpoints kept for being best (in addition to the newest ones).
    async_save: write in a background thread.
    """
    save_every: int = 100
    max_to_keep: int = 2
    best_metric: str = ""
    best_mode: str = "max"
    keep_best: int = 1
    async_save: bool = True

    def __post_init__(self):
        config_lib.check_int("save_every", self.save_every, min_value=1)
        config_lib.check_int("max_to_keep", self.max_to_keep, min_value=1)
        config_lib.check(isinstance(self.best_metric, str), "best_metric", self.best_metric,
                         "must be a metric name (str), '' to disable")
        config_lib.check_one_of("best_mode", self.best_mode, ("max", "min"))
        config_lib.check_int("keep_best", self.keep_best, min_value=0)
        config_lib.check(isinstance(self.async_save, bool), "async_save", self.async_save,
                         "must be a bool")


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


class Checkpointer:
    """Saves and restores consistent cuts of a run under `directory` (e.g. workdir/checkpoints).

    All processes of a multi-process run call `save` and `restore` with the same arguments
    (orbax writes each process's shards; JSON and numpy items are written by process 0).
    """

    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig = CheckpointConfig()):
        self.cfg = cfg
        self.directory = os.path.abspath(os.fspath(directory))
        policies = [checkpoint_managers.LatestN(n=cfg.max_to_keep)]
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

    def due(self, step: int) -> bool:
        """Whether the periodic schedule asks for a save at `step`."""
        return step > 0 and step % self.cfg.save_every == 0

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
        if _MANIFEST_KEY in meta:
            raise ValueError(f"meta key {_MANIFEST_KEY!r} is reserved")
        meta[_MANIFEST_KEY] = manifest
        # An empty dict (a step without evaluation) is "no metrics", not a missing metric.
        metrics = {k: float(v) for k, v in metrics.items()} if metrics else None
        if self.cfg.best_metric and metrics is not None and self.cfg.best_metric not in metrics:
            raise KeyError(f"metrics passed to save lack best_metric={self.cfg.best_metric!r}")
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeSave(_keys_to_data(state)),
                                    meta=ocp.args.JsonSave(meta),
                                    arrays=ocp.args.PyTreeSave(flat)),
            metrics=metrics, force=True)
        if not saved:
            raise RuntimeError(f"orbax declined to save step {step} under {self.directory}")

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best `best_metric` (the latest step when best tracking is off)."""
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, state_target: Any, step: int | None = None, *,
                partial: bool = False) -> Restored:
        """Restores `step` (default: latest) with the state placed like `state_target`.

        state_target: a pytree matching the saved state whose array leaves are arrays or
          `jax.ShapeDtypeStruct`s carrying the wanted sharding (and dtype: a cast happens on
          load); typed PRNG keys are rebuilt from their key data with the target's impl.
        partial: `state_target` may name a subset of the saved state's dict keys (e.g. only
          {"params", "router"} to initialise RL from an SFT run); the rest is not read.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint under {self.directory}")
        abstract = _abstract_target(state_target)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=partial),
            meta=ocp.args.JsonRestore(),
            arrays=ocp.args.PyTreeRestore()))
        meta = dict(restored["meta"])
        manifest = meta.pop(_MANIFEST_KEY)
        arrays = decode_arrays(restored["arrays"], manifest)
        state = _to_target(restored["state"], state_target)
        return Restored(step=step, state=state, meta=meta, arrays=arrays)

    def wait(self) -> None:
        """Blocks until every started save is committed to disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's threads. Call on exit."""
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
