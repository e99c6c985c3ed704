"""The ``paced`` policy: C3PO++'s budget and carry-over with staleness kept by pacing admission,
never by purging (issue 14, item 3). With the fake engine: nothing is lost, no trained token lags
more than σ_max versions, the pipeline cap is the documented one, and on a long-tailed length mix
it trains exactly the responses ``sync`` trains, where purging ``c3po`` trains shorter ones."""
import importlib.util
import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from ring_jax.config import ConfigError
from ring_jax.rollout.types import SamplingParams
from ring_jax.scheduler import Scheduler, SchedulerConfig, View
from ring_jax.scheduler import testing

_spec = importlib.util.spec_from_file_location(
    "scheduler_properties", pathlib.Path(__file__).with_name("test_properties.py"))
properties = importlib.util.module_from_spec(_spec)  # its strategy and invariant checks
_spec.loader.exec_module(properties)


def _trained(batches):
    return [(int(g), int(i)) for b in batches
            for g, i in zip(b["group_ids_B"], b["sample_index_B"]) if g >= 0]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(properties.schedules("paced"))
def test_paced_loses_nothing_and_respects_sigma_max(case):
    """Random length mixes, budgets, σ_max (0-3), capacities and trainers publishing 1 or 2
    versions per batch: told the trainer's rate, the policy purges nothing and trains every
    response exactly once within σ_max (a purge anywhere would show in purged_request_ids)."""
    u = case["updates_per_batch"]
    config = case["config"]
    case["config"] = SchedulerConfig(**{**config.__dict__,
                                        "policy_params": (("versions_per_batch", u),)})
    batches, metrics, sched = properties._run(case)
    assert not sched.purged_request_ids
    trained = _trained(batches)
    G = config.group_size
    assert sorted(trained) == [(g, i) for g in range(case["num_prompts"]) for i in range(G)]
    for batch in batches:
        mask = batch["loss_mask_BT"] > 0
        for b in range(config.batch_size):
            if mask[b].any():
                lag = int(batch["train_version"]) - batch["versions_BT"][b][mask[b]].min()
                assert lag <= config.sigma_max
    assert all(m["sched/responses_purged"] == 0 for m in metrics)
    # Budget Φ per iteration as C3PO++ (overshoot < one decode step of all slots).
    worst = max((m.get("rollout/tokens_generated_max_per_iteration", 0) for m in metrics),
                default=0)
    assert worst <= config.token_budget + case["num_slots"] - 1
    properties._check_invariants(case, record_events=False)  # tokens, groups, advantages


def test_pipeline_cap_by_hand():
    # P = 8 / 2 = 4 groups per batch, σ_max = 3.
    policy = SchedulerConfig(mode="paced", group_size=2, batch_size=8, sigma_max=3,
                             max_active_requests=64).make_policy()
    fresh = View(version=10, num_buffered=0, oldest_versions={})
    assert policy.max_pipeline_groups(fresh) == 4 * (1 + 3)  # nothing carried: σ_max + 1 batches
    assert policy.num_new_groups(fresh) == 16
    # Oldest carried token from version 8 (λ = 2): one more batch may follow this one.
    carried = View(version=10, num_buffered=6, oldest_versions={0: 8, 1: 9},
                   num_groups=3, num_ready=1)
    assert policy.max_pipeline_groups(carried) == 4 * 2
    assert policy.num_new_groups(carried) == 8 - 3 - 1
    # The oldest token may sit in a ready group too; at λ = σ_max only this batch is open.
    at_bound = View(version=10, num_buffered=6, oldest_versions={1: 9}, num_groups=3,
                    num_ready=1, oldest_ready_version=7)
    assert policy.max_pipeline_groups(at_bound) == 4
    assert policy.num_new_groups(at_bound) == 0
    # Capacity still bounds admission (a bug that ignored it would admit 16 here).
    small = SchedulerConfig(mode="paced", group_size=2, batch_size=8, sigma_max=3,
                            max_active_requests=10).make_policy()
    assert small.num_new_groups(View(version=0, num_buffered=4, oldest_versions={})) == 3
    # Refills: none once Φ is spent; else the same cap with the groups admitted so far.
    assert policy.num_refill_groups(carried, 0, policy.config.token_budget) == 0
    assert policy.num_refill_groups(carried, 60, 0) == 2  # 4 free requests, room for 4 groups
    # Two versions per batch halve the horizon: ⌊(3 - 0) / 2⌋ = 1 more batch.
    u2 = SchedulerConfig(mode="paced", group_size=2, batch_size=8, sigma_max=3,
                         policy_params=(("versions_per_batch", 2),)).make_policy()
    assert u2.max_pipeline_groups(fresh) == 8
    assert policy.groups_to_purge(at_bound) == [] and policy.max_version_lag() == 3


def test_bad_versions_per_batch_fails_at_config_build():
    with pytest.raises(ConfigError, match=r"policy_params.versions_per_batch=0 is invalid: "
                                          r"must be >= 1"):
        SchedulerConfig(mode="paced", policy_params=(("versions_per_batch", 0),))


# ------------------------------------------------------------------ length bias of purging

NUM_PROMPTS, G = 24, 4


def _long_tailed_length(request):
    """Per (prompt, sample): 85% short (2-6 tokens), 15% 7x longer (35-42 tokens)."""
    rng = np.random.default_rng([request.metadata["prompt_id"],
                                 request.metadata["sample_index"]])
    return int(rng.integers(35, 43)) if rng.random() < 0.15 else int(rng.integers(2, 7))


def _trained_lengths(mode, **kw):
    """(prompt id, sample index) -> trained response length, per-batch and final metrics.
    No prompt is re-queued (drop_group), so group ids are prompt ids under every mode."""
    config = SchedulerConfig(mode=mode, group_size=G, batch_size=2 * G, max_seq_len=64,
                             sampling=SamplingParams(max_new_tokens=48), token_budget=24,
                             sigma_max=1, purge_policy="drop_group", max_active_requests=32,
                             step_chunk_tokens=4, num_reward_workers=2, **kw)
    engine = testing.FakeEngine(8, _long_tailed_length)
    metrics = []
    with Scheduler(config, engine, testing.prompt_records(NUM_PROMPTS),
                   lambda rec, req: (float(req.num_generated % 2), {}),
                   testing.grpo_advantages) as sched:
        batches = testing.run_training(sched, metrics=metrics)
        lengths = {}
        for batch in batches:
            for b in np.flatnonzero(batch["group_ids_B"] >= 0):
                key = (int(batch["group_ids_B"][b]), int(batch["sample_index_B"][b]))
                assert key not in lengths
                lengths[key] = int(batch["loss_mask_BT"][b].sum())
        return lengths, metrics, sched.pop_metrics()


def test_purging_biases_toward_short_responses_pacing_does_not():
    sync, _, _ = _trained_lengths("sync")
    c3po, _, c3po_totals = _trained_lengths("c3po")
    paced, paced_metrics, paced_totals = _trained_lengths("paced")
    assert len(sync) == NUM_PROMPTS * G
    # Purging c3po at σ_max = 1 loses responses, the long ones above all, so what it trains is
    # shorter than the same prompts' responses under sync.
    assert c3po_totals["sched/total/purged_responses"] > 0
    assert len(c3po) < len(sync)
    assert np.mean(list(c3po.values())) < np.mean(list(sync.values())) - 1.0
    long_sync = sum(n >= 35 for n in sync.values())
    assert sum(n >= 35 for n in c3po.values()) < long_sync
    # Paced at the same σ_max trains every response sync trains, each with the same length,
    # and carries work across versions to do it (it is not sync in disguise).
    assert paced == sync
    assert paced_totals["sched/total/purged_responses"] == 0
    assert paced_totals["sched/total/carried_responses"] > 0
    # The per-batch length metrics report the distribution the study tables show.
    means = [m["sched/trained_response_len_mean"] for m in paced_metrics]
    p90s = [m["sched/trained_response_len_p90"] for m in paced_metrics]
    assert all(p >= m for m, p in zip(means, p90s)) and max(p90s) >= 35


def test_trainer_faster_than_declared_is_purged_visibly():
    """The guarantee assumes at most ``versions_per_batch`` versions per batch. A trainer that
    publishes 2 while the policy assumes 1 ages groups past σ_max: the batch-time check purges
    them, counted by reason (never silently trained stale); declaring u = 2 purges nothing."""
    def run(policy_params):
        config = SchedulerConfig(mode="paced", group_size=G, batch_size=2 * G, max_seq_len=64,
                                 sampling=SamplingParams(max_new_tokens=48), token_budget=24,
                                 sigma_max=1, policy_params=policy_params,
                                 max_active_requests=32, step_chunk_tokens=4)
        with Scheduler(config, testing.FakeEngine(8, _long_tailed_length),
                       testing.prompt_records(NUM_PROMPTS), lambda rec, req: (1.0, {}),
                       testing.grpo_advantages) as sched:
            batches = testing.run_training(sched, updates_per_batch=2)
            return len(_trained(batches)), sched.pop_metrics()

    trained, totals = run(())
    assert totals["sched/total/purged_groups/stale_at_batch"] > 0
    assert trained + totals["sched/total/purged_responses"] == NUM_PROMPTS * G
    trained, totals = run((("versions_per_batch", 2),))
    assert trained == NUM_PROMPTS * G and totals["sched/total/purged_responses"] == 0
