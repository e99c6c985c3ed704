"""The grain view of the scheduler emits the same batches as `next_batch`, then stops for good."""
import importlib.util
import pathlib

import numpy as np
import pytest

from ring_jax.scheduler import testing

_spec = importlib.util.spec_from_file_location(
    "restore_worker", pathlib.Path(__file__).with_name("restore_worker.py"))
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


@pytest.mark.parametrize("mode,prefetch", [("c3po", 0), ("async", 2)])
def test_grain_dataset_matches_next_batch(mode, prefetch):
    with worker.build(mode) as sched:
        expected = testing.run_training(sched)
    with worker.build(mode) as sched:
        got = []
        iterator = iter(sched.as_dataset(prefetch=prefetch))
        for batch in iterator:
            got.append(batch)
            sched.update_weights(None, sched.version + 1)
        with pytest.raises(StopIteration):  # sticky once exhausted
            next(iterator)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
