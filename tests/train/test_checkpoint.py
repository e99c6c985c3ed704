"""Checkpointer: round trip of all three items, retention, ragged encoding, crash safety."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ring_jax.config import ConfigError
from ring_jax.train import checkpoint, optim

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _state(seed: int):
    params = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) + seed,
              "b": jnp.full((4,), seed, jnp.bfloat16)}
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=0.1))
    return {"params": params, "opt_state": tx.init(params),
            "router": {"bias_E": jnp.linspace(-1, 1, 4) * seed},
            "step": jnp.asarray(seed, jnp.int32),
            "rng": jax.random.fold_in(jax.random.key(0), seed)}


def _arrays(seed: int):
    rng = np.random.default_rng(seed)
    return {"buffer": {"tokens": [rng.integers(0, 9, n).astype(np.int32) for n in (3, 0, 5)],
                       "logp": [rng.normal(size=(n,)).astype(np.float32) for n in (3, 0, 5)],
                       "expert_ids": [rng.integers(0, 4, (n, 2, 2)).astype(np.int8)
                                      for n in (3, 0, 5)]},
            "none_yet": [],
            "sigma": np.array([0, 2, 1], np.int64),
            "empty2d": np.zeros((0, 7), np.float32),
            "scalar": np.float64(seed)}


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_round_trip_all_items(tmp_path):
    state, arrays = _state(3), _arrays(3)
    meta = {"scheduler": {"policy_version": 7, "budget": 1.5}, "data": {"next_index": 42},
            "config": {"name": "x"}}
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(5, state=state, meta=meta, arrays=arrays)
    # A fresh manager (a restarted process) sees the committed step.
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() == 5
        restored = ckpt.restore(_state(0))
    assert restored.step == 5
    assert restored.meta == meta
    _assert_tree_equal(restored.state, state)
    # The key is a typed key again: it draws the same numbers.
    np.testing.assert_array_equal(jax.random.uniform(restored.state["rng"], (3,)),
                                  jax.random.uniform(state["rng"], (3,)))
    assert set(restored.arrays) == set(arrays)
    for name in ("tokens", "logp", "expert_ids"):
        _assert_tree_equal(restored.arrays["buffer"][name], arrays["buffer"][name])
    assert restored.arrays["none_yet"] == []
    _assert_tree_equal(restored.arrays["sigma"], arrays["sigma"])
    assert restored.arrays["empty2d"].shape == (0, 7)
    assert restored.arrays["scalar"].shape == () and float(restored.arrays["scalar"]) == 3.0


def test_restore_onto_abstract_target_with_cast(tmp_path):
    state = _state(2)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state=state)
        target = jax.tree.map(lambda x: x, _state(0))
        target["params"]["b"] = jax.ShapeDtypeStruct((4,), jnp.float32)
        restored = ckpt.restore(target)
    assert restored.state["params"]["b"].dtype == jnp.float32
    np.testing.assert_array_equal(restored.state["params"]["b"], np.full((4,), 2.0))
    assert restored.arrays == {} and restored.meta == {}


def test_retention_keeps_newest_and_best(tmp_path):
    cfg = checkpoint.CheckpointConfig(max_to_keep=2, best_metric="eval/acc", keep_best=1,
                                      async_save=False)
    evals = {2: 0.3, 4: 0.9, 6: 0.5}   # steps 1,3,5,7 are saved without an eval
    with checkpoint.Checkpointer(tmp_path, cfg) as ckpt:
        for step in range(1, 8):
            # No eval: None or an empty dict (what a loop filtering "eval/" keys passes).
            metrics = {"eval/acc": evals[step]} if step in evals else (None if step < 4 else {})
            ckpt.save(step, state=_state(step), metrics=metrics)
        ckpt.wait()
        # Newest two (6, 7) plus the best evaluated (4); a plain keep-last-2 would drop 4.
        assert ckpt.all_steps() == [4, 6, 7]
        assert ckpt.best_step() == 4
        _assert_tree_equal(ckpt.restore(_state(0), step=4).state, _state(4))


def test_save_requires_best_metric_when_metrics_given(tmp_path):
    cfg = checkpoint.CheckpointConfig(best_metric="eval/acc")
    with checkpoint.Checkpointer(tmp_path, cfg) as ckpt:
        with pytest.raises(KeyError, match="eval/acc"):
            ckpt.save(1, state=_state(1), metrics={"eval/other": 1.0})


def test_restore_without_checkpoint_raises(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError):
            ckpt.restore(_state(0))


def test_due():
    ckpt_cfg = checkpoint.CheckpointConfig(save_every=3)
    due = [s for s in range(10) if checkpoint.Checkpointer.due(
        type("C", (), {"cfg": ckpt_cfg})(), s)]
    assert due == [3, 6, 9]


@pytest.mark.parametrize("kwargs, message", [
    (dict(save_every=0), "save_every=0 is invalid: must be >= 1"),
    (dict(max_to_keep=0), "max_to_keep=0 is invalid: must be >= 1"),
    (dict(best_mode="best"), "best_mode='best' is invalid: must be one of ('max', 'min')"),
    (dict(keep_best=-1), "keep_best=-1 is invalid: must be >= 0"),
    (dict(best_metric=None), "best_metric=None is invalid: must be a metric name (str), '' to "
                             "disable"),
    (dict(async_save="yes"), "async_save='yes' is invalid: must be a bool"),
])
def test_invalid_configs(kwargs, message):
    with pytest.raises(ConfigError) as err:
        checkpoint.CheckpointConfig(**kwargs)
    assert str(err.value) == message


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=6), st.integers(0, 2),
       hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
def test_encode_decode_property(lengths, trailing, shape):
    rng = np.random.default_rng(len(lengths))
    ragged = [rng.integers(-5, 5, (n,) + (2,) * trailing).astype(np.int16) for n in lengths]
    fixed = rng.normal(size=shape).astype(np.float32)
    tree = {"a": {"ragged": ragged}, "fixed": fixed}
    flat, manifest = checkpoint.encode_arrays(tree)
    # Every stored array is 1-D and non-empty (orbax refuses zero-size arrays).
    assert all(v.ndim == 1 and v.size >= 1 for v in flat.values())
    back = checkpoint.decode_arrays(flat, manifest)
    assert len(back["a"]["ragged"]) == len(ragged)
    for x, y in zip(back["a"]["ragged"], ragged):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)
    assert back["fixed"].shape == fixed.shape
    np.testing.assert_array_equal(back["fixed"], fixed)


def test_encode_rejects_mixed_dtypes_and_bad_keys():
    with pytest.raises(ValueError, match="mix dtypes"):
        checkpoint.encode_arrays({"x": [np.zeros(2, np.int32), np.zeros(2, np.float32)]})
    with pytest.raises(ValueError, match="without '/'"):
        checkpoint.encode_arrays({"a/b": np.zeros(2)})


_SAVER = textwrap.dedent("""
    import sys, numpy as np, jax.numpy as jnp
    from ring_jax.train import checkpoint
    ckpt = checkpoint.Checkpointer(sys.argv[1], checkpoint.CheckpointConfig(max_to_keep=100))
    step = ckpt.latest_step() or 0
    while True:
        step += 1
        # ~16 MB per step so that a save is in flight most of the time.
        state = {"w": jnp.full((2048, 2048), float(step)), "step": jnp.asarray(step)}
        ckpt.save(step, state=state, meta={"step": step},
                  arrays={"buf": [np.full((step,), step, np.int32)]})
        print(step, flush=True)
        ckpt.wait()
""")


def _tmp_dirs(directory):
    return [n for n in os.listdir(directory) if "tmp" in n]


def test_sigkill_mid_save_leaves_previous_step_restorable(tmp_path):
    directory = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    killed_mid_save = False
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(directory)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            # Wait until at least one step is committed and a later save is being written.
            deadline = time.time() + 120
            while time.time() < deadline:
                if (directory.exists() and any(n.isdigit() for n in os.listdir(directory))
                        and _tmp_dirs(directory)):
                    break
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
        if _tmp_dirs(directory):
            killed_mid_save = True
            break
    assert killed_mid_save, "never caught a save in flight; the test did not test anything"

    with checkpoint.Checkpointer(directory) as ckpt:
        step = ckpt.latest_step()
        assert step is not None and step >= 1
        target = {"w": jax.ShapeDtypeStruct((2048, 2048), jnp.float32),
                  "step": jnp.asarray(0)}
        restored = ckpt.restore(target)
        assert int(restored.state["step"]) == step
        assert float(restored.state["w"][0, 0]) == float(step)
        assert float(restored.state["w"][-1, -1]) == float(step)
        assert restored.meta == {"step": step}
        np.testing.assert_array_equal(restored.arrays["buf"][0], np.full((step,), step))
        # The manager cleaned the interrupted save away and can save the next step.
        assert not _tmp_dirs(directory)
        ckpt.save(step + 1, state={"w": jnp.zeros((2048, 2048)), "step": jnp.asarray(step + 1)})
        ckpt.wait()
        assert ckpt.latest_step() == step + 1


def test_partial_restore_of_params_and_router(tmp_path):
    state = _state(4)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(9, state=state, meta={"stage": "sft"})
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        target = {"params": _state(0)["params"], "router": _state(0)["router"]}
        restored = ckpt.restore(target, partial=True)
    assert set(restored.state) == {"params", "router"}
    _assert_tree_equal(restored.state["params"], state["params"])
    _assert_tree_equal(restored.state["router"], state["router"])
    assert restored.meta == {"stage": "sft"}


def test_scheduler_encoded_state_round_trips(tmp_path):
    """The scheduler's flat numpy encoding (ring_jax.scheduler.state) as the `arrays` item."""
    from ring_jax.scheduler import state as sched_state
    tree = {"buffer": [{"tokens": np.arange(5, dtype=np.int32), "logp": np.zeros(0, np.float32),
                        "sigma": 2}], "version": 3, "empty": np.zeros((0, 4), np.int64)}
    flat = sched_state.encode(tree)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state={"step": jnp.asarray(1)}, arrays={"scheduler": flat})
        restored = ckpt.restore({"step": jnp.asarray(0)})
    back = sched_state.decode(restored.arrays["scheduler"])
    np.testing.assert_array_equal(back["buffer"][0]["tokens"], np.arange(5))
    assert back["buffer"][0]["logp"].shape == (0,) and back["buffer"][0]["sigma"] == 2
    assert back["version"] == 3 and back["empty"].shape == (0, 4)


# ------------------------------------------------------------------ integrity and fallback


def _random_state(step: int):
    return {"w": jax.random.normal(jax.random.key(step), (128, 128)),
            "step": jnp.asarray(step, jnp.int32)}


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """A real checkpoint directory with intact steps 1, 2, 3 (random weights, so the array
    files are large and incompressible); tests copy it and damage the copy."""
    directory = tmp_path_factory.mktemp("three_steps") / "ckpt"
    with checkpoint.Checkpointer(directory, checkpoint.CheckpointConfig(max_to_keep=5)) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, state=_random_state(step), meta={"step": step},
                      arrays={"buf": [np.arange(step, dtype=np.int32)]})
    return directory


def _largest_file(directory):
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def _xor_400_bytes(step_dir):
    """A flipped region that TensorStore reads back without any error (the issue's repro)."""
    path = _largest_file(step_dir / "state")
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + 400] = bytes(b ^ 0xFF for b in data[middle:middle + 400])
    open(path, "wb").write(bytes(data))


def _truncate_array_file(step_dir):
    path = _largest_file(step_dir / "state")
    os.truncate(path, os.path.getsize(path) // 2)


def _truncate_meta(step_dir):
    path = step_dir / "meta" / "metadata"
    os.truncate(path, os.path.getsize(path) // 2)


def _empty_step_dir(step_dir):
    import shutil
    shutil.rmtree(step_dir)
    step_dir.mkdir()


def _edit_meta_value(step_dir):
    """Valid JSON with a changed value: only the meta digest (stored in `arrays`) notices."""
    path = step_dir / "meta" / "metadata"
    text = open(path).read()
    assert '"step": 3' in text
    open(path, "w").write(text.replace('"step": 3', '"step": 9'))


def _drop_integrity_record(step_dir):
    """Valid JSON without the integrity record: not mistaken for an old unverified format."""
    import json
    path = step_dir / "meta" / "metadata"
    meta = json.load(open(path))
    del meta["_integrity"]
    json.dump(meta, open(path, "w"))


DAMAGES = {"dropped_integrity_record": _drop_integrity_record, "xor_state": _xor_400_bytes, "truncated_array_file": _truncate_array_file,
           "truncated_meta": _truncate_meta, "empty_step_dir": _empty_step_dir,
           "edited_meta": _edit_meta_value}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_latest_falls_back_to_newest_intact(three_steps, tmp_path, caplog, damage):
    import shutil
    directory = tmp_path / "ckpt"
    shutil.copytree(three_steps, directory)
    DAMAGES[damage](directory / "3")
    with checkpoint.Checkpointer(directory) as ckpt:
        with caplog.at_level("WARNING", logger=checkpoint.__name__):
            restored = ckpt.restore(_random_state(0))
        # Without verification the xor case would restore step 3 with garbage weights.
        assert restored.step == 2
        _assert_tree_equal(restored.state, _random_state(2))
        assert restored.meta == {"step": 2}
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
                    and r.name == checkpoint.__name__]
        assert len(warnings) == 1 and len(warnings[0].splitlines()) == 1
        assert f"{directory / '3'} is damaged" in warnings[0]
        # Set aside (kept for inspection), so the step can be written again.
        assert ckpt.all_steps() == [1, 2]
        assert (directory / "3.damaged").is_dir()
        ckpt.save(3, state=_random_state(3), meta={"step": 3})
        ckpt.wait()
    with checkpoint.Checkpointer(directory) as ckpt:
        assert ckpt.all_steps() == [2, 3]   # max_to_keep=2 rotated step 1 out
        _assert_tree_equal(ckpt.restore(_random_state(0)).state, _random_state(3))


def test_read_only_restore_skips_damage_in_place(three_steps, tmp_path, caplog):
    """Reading another run's checkpoints (init_from, load_policy) never renames its files."""
    import shutil
    directory = tmp_path / "ckpt"
    shutil.copytree(three_steps, directory)
    _truncate_meta(directory / "3")
    with checkpoint.Checkpointer(directory) as ckpt:
        with caplog.at_level("WARNING", logger=checkpoint.__name__):
            restored = ckpt.restore(_random_state(0), read_only=True)
    assert restored.step == 2
    assert sorted(os.listdir(directory)) == ["1", "2", "3"]
    assert any(f"{directory / '3'} is damaged" in r.getMessage() and "skipped" in r.getMessage()
               for r in caplog.records)


def test_no_intact_step_names_every_path(three_steps, tmp_path):
    import shutil
    directory = tmp_path / "ckpt"
    shutil.copytree(three_steps, directory)
    _xor_400_bytes(directory / "3")
    _truncate_meta(directory / "2")
    _empty_step_dir(directory / "1")
    with checkpoint.Checkpointer(directory) as ckpt:
        with pytest.raises(checkpoint.DamagedCheckpointError) as err:
            ckpt.restore(_random_state(0))
    message = str(err.value)
    assert len(message.splitlines()) == 1
    for step, reason in ((3, "checksum mismatch"), (2, "JSONDecodeError"), (1, "not found")):
        assert f"{directory / str(step)} (" in message and reason in message, message
    # Nothing was moved: the user decides what to do with a run that has no intact step.
    assert sorted(os.listdir(directory)) == ["1", "2", "3"]


def test_explicit_damaged_step_raises(three_steps, tmp_path):
    import shutil
    directory = tmp_path / "ckpt"
    shutil.copytree(three_steps, directory)
    _xor_400_bytes(directory / "2")
    with checkpoint.Checkpointer(directory) as ckpt:
        with pytest.raises(checkpoint.DamagedCheckpointError, match="2 .state.'w'.: checksum"):
            ckpt.restore(_random_state(0), step=2)
        assert ckpt.all_steps() == [1, 2, 3]


def test_other_state_shape_is_a_mismatch_not_damage(three_steps):
    target = {"w": jnp.zeros((64, 128)), "step": jnp.asarray(0)}
    with checkpoint.Checkpointer(three_steps) as ckpt:
        with pytest.raises(checkpoint.CheckpointMismatchError,
                           match=r"state\['w'\]: saved shape \[128, 128\], wanted \[64, 128\]"):
            ckpt.restore(target)
        assert ckpt.all_steps() == [1, 2, 3]


def test_retention_keeps_newest_finite_step(tmp_path):
    cfg = checkpoint.CheckpointConfig(max_to_keep=1, async_save=False)
    nan_state = lambda s: {"w": jnp.full((4,), jnp.nan), "step": jnp.asarray(s)}
    with checkpoint.Checkpointer(tmp_path, cfg) as ckpt:
        ckpt.save(1, state=_random_state(1))
        ckpt.save(2, state=_random_state(2))
        ckpt.save(3, state=nan_state(3))
        ckpt.save(4, state=nan_state(4))
        # Plain keep-last-1 would keep only 4; 2 is the newest step saved finite.
        assert ckpt.all_steps() == [2, 4]
    # A restarted process reads the finiteness back from the steps' integrity records.
    with checkpoint.Checkpointer(tmp_path, cfg) as ckpt:
        ckpt.save(5, state=nan_state(5))
        assert ckpt.all_steps() == [2, 5]
        ckpt.save(6, state=_random_state(6))
        assert ckpt.all_steps() == [6]


def test_fingerprint_is_sharding_independent_and_exact():
    from ring_jax.train import integrity
    x = jax.random.normal(jax.random.key(0), (8, 16))
    record, finite = integrity.summarise_state({"x": x, "b": x.astype(jnp.bfloat16),
                                                "k": jnp.arange(3, dtype=jnp.int8)})
    assert finite and set(record) == {"['x']", "['b']", "['k']"}
    # One flipped bit in one element changes the fingerprint (a bug summing values would not
    # see a sign flip of a zero, nor a swap of two elements).
    flipped = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(x, jnp.uint32).at[3, 5].add(1), jnp.float32)
    swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
    for other in (flipped, swapped):
        assert integrity.summarise_state({"x": other})[0]["['x']"][0] != record["['x']"][0]
    assert integrity.summarise_state({"x": x})[0]["['x']"] == record["['x']"]
    assert not integrity.summarise_state({"x": x.at[1, 1].set(jnp.inf)})[1]


_FILL_DISK = textwrap.dedent("""
    import sys, jax
    from ring_jax.train import checkpoint
    cfg = checkpoint.CheckpointConfig(async_save=sys.argv[2] == "async")
    with checkpoint.Checkpointer(sys.argv[1], cfg) as ckpt:
        for step in range(1, 20):
            ckpt.save(step, state={"w": jax.random.normal(jax.random.key(step), (256, 256))})
""")


def _can_mount_tmpfs():
    import shutil
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare + an unprivileged tmpfs mount")
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_disk_full_is_one_line(tmp_path, mode):
    """A real ENOSPC (a 600 KiB tmpfs in a private mount namespace): one DiskFullError line
    naming the directory and the free space, none of orbax's per-thread ENOSPC tracebacks
    (~430 lines before).

    Not asserted away: when the disk fills mid-write (0 B free), orbax's synchronous save can
    close its event loop while tensorstore writes are still in flight; their late callbacks
    print "Event loop is closed" and an abandoned coroutine's "Exception ignored" at
    interpreter exit (~1 run in 8 here, upstream teardown, ≤ ~25 lines). Threads orbax starts
    are joined before the error is raised (`test_disk_full_joins_the_orbax_threads_...`)."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    script = (f"mount -t tmpfs -o size=600k none {mount} && "
              f"exec {sys.executable} -c '{_FILL_DISK}' {mount}/ckpt {mode}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"),
                          timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    error = [i for i, line in enumerate(lines) if line.startswith(
        f"ring_jax.train.checkpoint.DiskFullError: no space left on device writing "
        f"checkpoints under {mount}/ckpt (")]
    assert len(error) == 1 and lines[error[0]].endswith(" free)"), proc.stderr
    # The uncaught exception's own traceback (main.py turns it into its last line alone).
    start = max(i for i in range(error[0]) if lines[i] == "Traceback (most recent call last):")
    assert error[0] - start < 15, proc.stderr
    # The full disk is said once: no orbax thread logs or re-raises its ENOSPC.
    assert sum("No space left on device" in line or "ENOSPC" in line
               for line in lines) == 0, proc.stderr
    assert not any(line.startswith("ERROR:absl") for line in lines), proc.stderr
    assert len(lines) < 40, proc.stderr


def test_disk_full_joins_the_orbax_threads_the_save_started(tmp_path, monkeypatch):
    """A failed save's lingering orbax thread (a metadata writer waiting on the failed
    commits) has ended when `DiskFullError` is raised, so an exit right after cannot race it
    (it used to print tracebacks against the interpreter's shut-down executors)."""
    import errno
    import threading

    finished = threading.Event()

    class LingeringWriter(threading.Thread):
        def run(self):
            time.sleep(0.5)
            finished.set()

    LingeringWriter.__module__ = "orbax.checkpoint.fake"

    def failing_save(*args, **kwargs):
        LingeringWriter().start()
        raise OSError(errno.ENOSPC, "No space left on device")

    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
    monkeypatch.setattr(ckpt._manager, "save", failing_save)
    with pytest.raises(checkpoint.DiskFullError):
        ckpt.save(1, state=_state(1))
    assert finished.is_set()
    ckpt.close()
