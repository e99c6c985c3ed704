"""The fake engine honours the engine contract the scheduler is built against."""
import numpy as np
import pytest

from ring_jax.rollout.types import Request, SamplingParams
from ring_jax.scheduler import testing


def _requests(n, max_new=50):
    return [Request(request_id=f"r{i}", prompt_tokens=np.array([1, 2, 3], np.int32),
                    sampling=SamplingParams(max_new_tokens=max_new), seed=i) for i in range(n)]


def test_budget_overshoot_below_num_slots_and_continuous_refill():
    lengths = {f"r{i}": 3 + 7 * i for i in range(6)}
    engine = testing.FakeEngine(4, lambda r: lengths[r.request_id])
    engine.add(_requests(6))
    out = engine.step(10)
    # 3 decode steps of 4 slots: the first step boundary at or past 10 tokens is 12; r0 (3
    # tokens) is done by then.
    assert out.num_new_tokens == 12 and out.num_in_flight == 5
    assert [r.request_id for r in out.finished] == ["r0"]
    out = engine.step(None)
    assert out.num_in_flight == 0
    assert sorted(r.request_id for r in out.finished) == [f"r{i}" for i in range(1, 6)]
    # r0 finished at step 3 and r1 at step 10; their slots went to r4 and r5 at once
    # (continuous refill), so the decode steps are the longest slot chain, not a sum of waves.
    assert engine.num_decode_steps == max(3 + lengths["r4"], lengths["r3"], lengths["r5"] + 10)
    for r in out.finished:
        assert r.num_generated == lengths[r.request_id]
        assert r.finish_reason == "stop"


@pytest.mark.parametrize("budget", [1, 5, 17])
def test_drain_resume_keeps_tokens_and_stamps_versions(budget):
    engine = testing.FakeEngine(3, lambda r: 20, expert_ids_shape=(2, 2))
    engine.add(_requests(3))
    engine.step(budget)
    drained = engine.drain()
    assert len(drained) == 3 and engine.step(None).num_in_flight == 0
    engine.load_weights(None, 7)
    engine.add(drained)
    finished = engine.step(None).finished
    for r in finished:
        assert r.num_generated == 20
        expected = [testing.fake_token(r.seed, i, 1000) for i in range(20)]
        np.testing.assert_array_equal(r.tokens, expected)
        cut = int(np.sum(r.versions == 0))
        assert cut >= 1 and np.all(r.versions[cut:] == 7)
        assert r.expert_ids.shape == (20, 2, 2)


def test_max_new_tokens_gives_length_finish():
    engine = testing.FakeEngine(2, lambda r: 100)
    engine.add(_requests(1, max_new=5))
    (r,) = engine.step(None).finished
    assert r.num_generated == 5 and r.finish_reason == "length"


def test_refill_min_rows_waits_for_that_many_free_slots():
    lengths = dict(zip([f"r{i}" for i in range(6)], [3, 10, 20, 24, 30, 5]))
    engine = testing.FakeEngine(4, lambda r: lengths[r.request_id], refill_min_rows=2)
    engine.add(_requests(6))
    out = engine.step(None)
    assert sorted(r.request_id for r in out.finished) == [f"r{i}" for i in range(6)]
    # r0 frees a slot at step 3, but the refill waits for r1's at step 10, so r4 (30 tokens)
    # ends at 40. Refilling at once (refill_min_rows=1) would start r4 at 3 and end at 33.
    assert engine.num_decode_steps == 10 + 30
    for r in out.finished:
        assert r.num_generated == lengths[r.request_id]


def test_simulated_prefill_call_cost_is_paid_once_per_refill(monkeypatch):
    slept = []
    monkeypatch.setattr(testing.time, "sleep", slept.append)
    engine = testing.FakeEngine(4, lambda r: 5, prefill_call_s=1.0, prefill_token_s=0.5)
    engine.add(_requests(4))
    engine.step(None)
    # One refill of 4 requests: one call and 4 × 3 prompt tokens, in one sleep.
    assert slept == [1.0 + 0.5 * 12]
