"""The grain view of the scheduler: the same batches as `next_batch`, sticky StopIteration, an
iterator state that is the scheduler's exact checkpoint, and async prefetch that changes
nothing but timing."""
import importlib.util
import pathlib
import time

import numpy as np
import pytest

from ring_jax.scheduler import testing

_spec = importlib.util.spec_from_file_location(
    "restore_worker", pathlib.Path(__file__).with_name("restore_worker.py"))
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def _build(mode, prefetch=None):
    sched = worker.build(mode)
    if prefetch is not None:
        sched.as_dataset(prefetch=prefetch)  # sets the scheduler's prefetch depth
    return sched


def _assert_same(got, expected):
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"batch {i} {k}")


def _totals(sched):
    return {k: v for k, v in sched.pop_metrics().items() if k.startswith("sched/total/")}


@pytest.mark.parametrize("mode,prefetch", [("c3po", 0), ("async", 2)])
def test_grain_dataset_matches_next_batch(mode, prefetch):
    with _build(mode, prefetch=0) as sched:
        expected = testing.run_training(sched)
    with _build(mode) as sched:
        got = []
        iterator = iter(sched.as_dataset(prefetch=prefetch))
        for batch in iterator:
            batch["train_version"] = np.int32(sched.version)
            got.append(batch)
            sched.update_weights(None, sched.version + 1)
        with pytest.raises(StopIteration):  # sticky once exhausted
            next(iterator)
    _assert_same(got, expected)


@pytest.mark.parametrize("updates_per_batch", [1, 2])
def test_async_prefetch_changes_nothing_but_timing(updates_per_batch):
    """Batches built ahead are the batches `next_batch` would build; with two versions per
    batch some go stale before they are taken and must be purged exactly as without prefetch."""
    runs = {}
    for prefetch in (0, 3):
        with _build("async", prefetch) as sched:
            # A slow trainer, so the producer does build batches ahead (a fast one always
            # waits for the producer and takes each batch itself).
            batches = testing.run_training(sched, updates_per_batch=updates_per_batch,
                                           step_delay_s=0.02)
            runs[prefetch] = batches, _totals(sched), sorted(sched.purged_request_ids)
    _assert_same(runs[3][0], runs[0][0])
    assert runs[3][1:] == runs[0][1:]
    if updates_per_batch == 2:
        assert runs[0][1]["sched/total/purged_groups/stale_at_batch"] > 0


def test_async_producer_builds_batches_ahead():
    with _build("async", prefetch=2) as sched:
        sched.next_batch()
        sched.state_dict()  # waits until the producer blocks on unpublished weights
        assert len(sched._assembled) >= 1  # pylint: disable=protected-access


def test_prefetch_is_refused_for_a_foreground_policy():
    with _build("c3po") as sched, pytest.raises(ValueError, match="trainer's thread"):
        sched.as_dataset(prefetch=1)


@pytest.mark.parametrize("mode,prefetch", [("sync", 0), ("c3po", 0), ("async", 2)])
def test_iterator_state_restores_exactly(mode, prefetch):
    """get_state after 3 batches → a fresh scheduler's iterator.set_state → the same tail (the
    batches the async producer had built ahead are rebuilt, not lost or repeated)."""
    with _build(mode, prefetch) as sched:
        reference = testing.run_training(sched)
        reference_totals = _totals(sched)

    def take(sched, iterator, n=None):
        out = []
        for batch in iterator:
            batch["train_version"] = np.int32(sched.version)
            out.append(batch)
            time.sleep(0.01)  # a train step: the async producer builds batches ahead meanwhile
            sched.update_weights(None, sched.version + 1)
            if len(out) == n:
                break
        return out

    with _build(mode, prefetch) as sched:
        iterator = iter(sched.as_dataset())
        head = take(sched, iterator, 3)
        state = iterator.get_state()
    with _build(mode, prefetch) as sched:
        iterator = iter(sched.as_dataset())
        iterator.set_state(state)
        sched.update_weights(None, sched.version)  # the trainer restores and re-publishes
        tail = take(sched, iterator)
        totals = _totals(sched)
    _assert_same(head + tail, reference)
    assert totals == reference_totals
