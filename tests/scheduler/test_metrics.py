"""Accounting on a schedule small enough to follow by hand."""
import numpy as np

from ring_jax.rollout.types import SamplingParams
from ring_jax.scheduler import Scheduler, SchedulerConfig
from ring_jax.scheduler import testing


def test_c3po_accounting_by_hand():
    # One slot, Φ = 4 tokens per iteration, two prompts (G = 1) of 10-token responses, both
    # admitted at once (capacity 2): g0 takes the slot, g1 waits.
    config = SchedulerConfig(mode="c3po", group_size=1, batch_size=1, max_seq_len=32,
                             sampling=SamplingParams(max_new_tokens=16), token_budget=4,
                             sigma_max=3, max_active_requests=2, step_chunk_tokens=0)
    engine = testing.FakeEngine(1, lambda r: 10)
    with Scheduler(config, engine, testing.prompt_records(2),
                   lambda rec, req: (1.0, {"len": req.num_generated}),
                   testing.grpo_advantages) as sched:
        first = sched.next_batch()
        m = sched.pop_metrics()
        # it1: g0 0→4 (cut); it2: g0 4→8 (cut); it3: g0 8→10 done, g1 takes the slot, 0→2 (cut
        # after its first 2 tokens). g1 drained twice with no tokens is not a cut.
        assert m["sched/iterations"] == 3
        assert m["rollout/tokens_generated"] == 12
        assert m["rollout/tokens_generated_max_per_iteration"] == 4
        assert m["sched/responses_carried"] == 2 + 2 + 1
        assert m["sched/responses_finished"] == 1
        assert m["sched/sigma_hist/2"] == 1  # g0 was cut twice before finishing
        assert m["sched/versions_spanned_max"] == 1 and m["sched/trained_tokens"] == 10
        assert m["sched/reward_info/len_mean"] == 10
        assert m["sched/buffer_size"] == 1 and m["sched/ready_groups"] == 0
        assert m["rollout/engine_busy_s"] <= m["rollout/phase_s"]
        assert int(first["group_ids_B"][0]) == 0

        sched.update_weights(None, 1)
        second = sched.next_batch()
        m = sched.pop_metrics()
        # it4 (v1): g1 2→6 (cut); it5: g1 6→10 done. Its tokens span versions 0 and 1.
        assert m["sched/iterations"] == 2 and m["rollout/tokens_generated"] == 8
        assert m["sched/sigma_hist/2"] == 1  # cut after it3 and it4
        assert m["sched/versions_spanned_max"] == 2 and m["sched/version_lag_max"] == 1
        versions = second["versions_BT"][0][second["loss_mask_BT"][0] > 0]
        np.testing.assert_array_equal(versions, [0, 0] + [1] * 8)
        assert m["sched/total/trained_responses"] == 2
        assert m["sched/total/generated_tokens"] == 20
        assert engine.loaded_versions == [1]


class _CountingEngine(testing.FakeEngine):
    """A fake engine that reports work like `Engine.pop_stats`: one unit per step call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.work = 0.0

    def step(self, token_budget=None):
        self.work += 1.0
        return super().step(token_budget)

    def pop_stats(self):
        out, self.work = {"decode_calls": self.work}, 0.0
        return out


def test_engine_stats_of_rollouts_only_reach_the_metrics():
    config = SchedulerConfig(mode="sync", group_size=1, batch_size=1, max_seq_len=32,
                             sampling=SamplingParams(max_new_tokens=16), step_chunk_tokens=4)
    engine = _CountingEngine(1, lambda r: 10)
    with Scheduler(config, engine, testing.prompt_records(2), lambda rec, req: (1.0, {}),
                   testing.grpo_advantages) as sched:
        engine.work = 100.0  # e.g. an evaluation that ran on the same engine
        sched.next_batch()
        # 10 tokens in chunks of 4: three step calls, and only those.
        assert sched.pop_metrics()["rollout/engine/decode_calls"] == 3.0
