"""Scheduler invariants under random schedules with the fake engine (hypothesis).

For random response-length mixes, budgets Φ, σ_max, G, slots, capacities and purge policies:
every response is trained exactly once or accounted as purged; a c3po iteration generates fewer
than Φ + num_slots tokens; no trained token lags the trainer by more than the mode's bound
(sync 0, c3po σ_max, async k); groups reach training complete and with their own advantages;
every recorded token is what the engine produced; and the same seed gives the same schedule.
The same invariants are checked for every registered policy.
"""
import random
import time

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ring_jax.rollout.types import SamplingParams
from ring_jax.scheduler import Scheduler, SchedulerConfig, derive_seed
from ring_jax.scheduler import policies, testing

VOCAB = 1000


def _scripted_length(seed, short_max, long_min, long_max, long_frac):
    """Long-tailed mix: most responses short, a fraction near the maximum."""
    rng = np.random.default_rng(seed)
    if rng.random() < long_frac:
        return int(rng.integers(long_min, long_max + 1))
    return int(rng.integers(1, short_max + 1))


def _length_fn(*mix):
    return lambda request: _scripted_length(request.seed, *mix)


def _reward(record, request):
    return float((request.num_generated + record["prompt_id"]) % 3), {"len": request.num_generated}


@st.composite
def schedules(draw, mode):
    group_size = draw(st.integers(1, 4))
    short_max = draw(st.integers(1, 6))
    long_min = draw(st.integers(short_max, 20))
    return dict(
        config=SchedulerConfig(
            mode=mode, group_size=group_size,
            batch_size=group_size * draw(st.integers(1, 3)), max_seq_len=32,
            sampling=SamplingParams(max_new_tokens=draw(st.integers(1, 24))),
            token_budget=draw(st.integers(1, 40)), sigma_max=draw(st.integers(0, 3)),
            purge_policy=draw(st.sampled_from(["drop_group", "requeue_prompt"])),
            max_prompt_retries=draw(st.integers(0, 2)),
            max_active_requests=group_size * draw(st.integers(1, 4)),
            max_staleness=draw(st.integers(1, 2)),
            step_chunk_tokens=draw(st.sampled_from([0, 3, 16])),
            num_reward_workers=draw(st.integers(1, 3)),
            seed=draw(st.integers(0, 5)),
            expert_ids_shape=(2, 2)),
        num_slots=draw(st.integers(1, 6)),
        lengths=(short_max, long_min, draw(st.integers(long_min, 30)),
                 draw(st.floats(0.0, 0.5))),
        num_prompts=draw(st.integers(1, 8)),
        updates_per_batch=draw(st.integers(1, 2)),
    )


def _jittery_reward(record, request):
    time.sleep(random.random() * 0.002)  # reward workers finish in a random order
    return _reward(record, request)


def _run(case, step_delay_s=0.0, decode_step_s=0.0, reward_fn=_reward):
    config = case["config"]
    engine = testing.FakeEngine(case["num_slots"], _length_fn(*case["lengths"]),
                                vocab_size=VOCAB, expert_ids_shape=(2, 2),
                                decode_step_s=decode_step_s)
    records = testing.prompt_records(case["num_prompts"], max_len=6, vocab_size=VOCAB)
    metrics = []
    with Scheduler(config, engine, records, reward_fn, testing.grpo_advantages) as sched:
        batches = testing.run_training(sched, updates_per_batch=case["updates_per_batch"],
                                       step_delay_s=step_delay_s, metrics=metrics)
        return batches, metrics, sched


def _check_invariants(case, record_events=True):
    config = case["config"]
    G = config.group_size
    batches, metrics, sched = _run(case)
    if record_events:  # coverage of the interesting paths (--hypothesis-show-statistics)
        totals = sched.pop_metrics()
        event(f"purged: {bool(sched.purged_request_ids)}")
        event(f"carried: {totals.get('sched/total/carried_responses', 0) > 0}")

    # Exactly once or purged: trained ids are unique, disjoint from purged ids, and together
    # they are every response the scheduler ever created.
    trained = [(int(g), int(i)) for b in batches
               for g, i in zip(b["group_ids_B"], b["sample_index_B"]) if g >= 0]
    assert len(trained) == len(set(trained))
    trained_ids = {f"g{g}-s{i}" for g, i in trained}
    purged_ids = set(sched.purged_request_ids)
    assert len(purged_ids) == len(sched.purged_request_ids)
    assert not trained_ids & purged_ids
    created = {f"g{g}-s{i}" for g in range(sched.state.next_group_id) for i in range(G)}
    assert trained_ids | purged_ids == created
    # Without purges every prompt is trained once (nothing is silently dropped).
    if not purged_ids:
        assert len(trained) == case["num_prompts"] * G

    for batch in batches:
        assert batch["tokens_BT"].shape == (config.batch_size, config.max_seq_len)
        version = int(batch["train_version"])
        rows_by_group = {}
        for b in range(config.batch_size):
            g, i = int(batch["group_ids_B"][b]), int(batch["sample_index_B"][b])
            if g < 0:
                assert not batch["loss_mask_BT"][b].any()
                continue
            rows_by_group.setdefault(g, []).append(b)
            mask = batch["loss_mask_BT"][b] > 0
            span = np.flatnonzero(mask)
            # The response is one contiguous span, and every token in it is what the fake
            # engine produced for this request's seed, with its log-prob.
            assert span.size >= 1 and np.all(np.diff(span) == 1)
            seed = derive_seed(config.seed, g, i)
            n = span.size
            expected = [testing.fake_token(seed, j, VOCAB) for j in range(n)]
            np.testing.assert_array_equal(batch["targets_BT"][b, span], expected)
            np.testing.assert_allclose(batch["logp_infer_BT"][b, span],
                                       [testing.fake_logprob(seed, j) for j in range(n)])
            # Response length is the scripted one (capped by max_new_tokens and the row).
            prompt_len = span[0] + 1
            target = min(config.sampling.max_new_tokens, config.max_seq_len - prompt_len)
            assert n == min(_scripted_length(seed, *case["lengths"]), target)
            # Staleness bound, and versions only move forward within a response.
            versions = batch["versions_BT"][b, span]
            assert np.all(np.diff(versions) >= 0)
            assert version - versions.min() <= config.max_version_lag
            assert np.all(batch["versions_BT"][b, ~mask] == -1)
            assert np.all(batch["expert_ids_BTLK"][b, ~mask] == -1)
        # Groups are complete inside one batch, with GRPO advantages of their own rewards.
        for g, rows in rows_by_group.items():
            assert sorted(batch["sample_index_B"][rows].tolist()) == list(range(G))
            np.testing.assert_allclose(
                batch["advantages_B"][rows],
                testing.grpo_advantages(batch["rewards_B"][rows]), rtol=1e-5, atol=1e-5)
    # Budget: a c3po iteration stops at the first decode step at or past Φ.
    if config.mode == "c3po":
        worst = max((m.get("rollout/tokens_generated_max_per_iteration", 0) for m in metrics),
                    default=0)
        assert worst <= config.token_budget + case["num_slots"] - 1
    return batches


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


_SETTINGS = settings(max_examples=60, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(schedules("c3po"))
def test_c3po_invariants_and_determinism(case):
    first = _check_invariants(case)
    # Same schedule however the reward workers' timing falls.
    _assert_same_batches(first, _run(case, reward_fn=_jittery_reward)[0])


@_SETTINGS
@given(schedules("sync"))
def test_sync_invariants(case):
    batches = _check_invariants(case)
    # The baseline is on-policy: every trained token was sampled by the trained version.
    for batch in batches:
        mask = batch["loss_mask_BT"] > 0
        assert np.all(batch["versions_BT"][mask] == batch["train_version"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules("async"))
def test_async_invariants_and_determinism(case):
    first = _check_invariants(case)
    # Same schedule whether the trainer or the producer is the slower side.
    _assert_same_batches(first, _run(case, step_delay_s=0.004)[0])
    _assert_same_batches(first, _run(case, decode_step_s=0.0005)[0])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.deferred(lambda: st.sampled_from(policies.names())).flatmap(schedules))
def test_every_registered_policy_keeps_the_invariants(case):
    """The contract for any policy in the registry (a fork's too, once its module is imported):
    nothing lost or duplicated, staleness within its `max_version_lag`, same seed same schedule."""
    event(f"mode: {case['config'].mode}")
    first = _check_invariants(case, record_events=False)
    _assert_same_batches(first, _run(case, reward_fn=_jittery_reward)[0])


def test_c3po_carries_long_responses_across_versions():
    """A hand-sized case where partial rollouts must happen: long responses span versions."""
    config = SchedulerConfig(mode="c3po", group_size=2, batch_size=2, max_seq_len=64,
                             sampling=SamplingParams(max_new_tokens=40), token_budget=8,
                             sigma_max=8, max_active_requests=4, step_chunk_tokens=0,
                             expert_ids_shape=(2, 2))
    case = dict(config=config, num_slots=4, lengths=(2, 30, 30, 0.3), num_prompts=6,
                updates_per_batch=1)
    batches = _check_invariants(case, record_events=False)
    spanned = [len(np.unique(b["versions_BT"][r][b["loss_mask_BT"][r] > 0]))
               for b in batches for r in range(2)]
    assert max(spanned) > 1  # a bug that never resumes would keep every response in 1 version
