"""An exception in any worker surfaces in the caller's thread within a second, with its original
traceback, and leaves no scheduler thread running; close() never hangs."""
import threading
import time
import traceback

import numpy as np
import pytest

from ring_jax.rollout.types import SamplingParams
from ring_jax.scheduler import Scheduler, SchedulerConfig
from ring_jax.scheduler import testing
from ring_jax.scheduler.workers import THREAD_PREFIX


class Injected(RuntimeError):
    pass


def _scheduler_threads():
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t.is_alive()]


class _Clock:
    """Remembers when the injected failure was raised."""
    raised_at = None

    @classmethod
    def fail(cls, where):
        cls.raised_at = time.perf_counter()
        raise Injected(f"injected failure in {where}")


def _build(mode, site):
    calls = {"reward": 0, "advantage": 0}
    lock = threading.Lock()

    def reward_fn(record, request):
        with lock:
            calls["reward"] += 1
            n = calls["reward"]
        if site == "reward" and n == 5:
            _Clock.fail("reward_fn")
        time.sleep(0.002)
        return 1.0, {}

    def advantage_fn(rewards):
        calls["advantage"] += 1
        if site == "advantage" and calls["advantage"] == 3:
            _Clock.fail("advantage_fn")
        return testing.grpo_advantages(rewards)

    def prompts():
        for i, record in enumerate(testing.prompt_records(40)):
            if site == "prompts" and i == 6:
                _Clock.fail("prompt iterator")
            yield record

    class FailingEngine(testing.FakeEngine):
        def step(self, token_budget=None):
            if site == "engine" and self.num_step_calls == 6:
                self.num_step_calls += 1
                _Clock.fail("engine.step")
            return super().step(token_budget)

    config = SchedulerConfig(mode=mode, group_size=2, batch_size=4, max_seq_len=40,
                             sampling=SamplingParams(max_new_tokens=30), token_budget=12,
                             sigma_max=2, max_active_requests=8, step_chunk_tokens=4,
                             num_reward_workers=3)
    engine = FailingEngine(2, lambda r: 1 + r.seed % 25, decode_step_s=0.001)
    return Scheduler(config, engine, prompts(), reward_fn, advantage_fn)


@pytest.mark.parametrize("site", ["engine", "reward", "advantage", "prompts"])
@pytest.mark.parametrize("mode", ["sync", "c3po", "async"])
def test_injected_exception_surfaces_within_a_second(mode, site):
    _Clock.raised_at = None
    sched = _build(mode, site)
    with pytest.raises(Injected) as info:
        testing.run_training(sched)
    caught_at = time.perf_counter()
    assert _Clock.raised_at is not None and caught_at - _Clock.raised_at < 1.0
    # The original traceback travels with it: the frame that raised is in it.
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "fail" in frames
    assert not _scheduler_threads()
    # Once failed, the scheduler keeps failing the same way rather than hanging or resuming.
    with pytest.raises(Injected):
        sched.next_batch()


def test_error_reaches_through_grain_dataset():
    sched = _build("async", "engine")
    with pytest.raises(Injected):
        for _ in sched.as_dataset():
            pass
    assert not _scheduler_threads()


def test_close_while_async_producer_waits_for_weights():
    sched = _build("async", None)
    sched.next_batch()  # the producer now runs ahead until it needs weights nobody publishes
    time.sleep(0.1)
    start = time.perf_counter()
    sched.close()
    assert time.perf_counter() - start < 1.0
    assert not _scheduler_threads()
    with pytest.raises(StopIteration):
        sched.next_batch()
    # Sticky: the grain view stops too.
    assert list(sched.as_dataset()) == []


def test_reward_pool_threads_stop_on_normal_close():
    with _build("c3po", None) as sched:
        batches = testing.run_training(sched, max_batches=2)
        assert len(batches) == 2 and np.all(batches[0]["group_ids_B"] >= 0)
        assert _scheduler_threads()
    assert not _scheduler_threads()
