"""Scheduling policies: a policy defined and registered here (nothing else touched) runs through
the fake engine; ``mode`` and ``policy_params`` are validated against the registry."""
import numpy as np
import pytest

from ring_jax.config import ConfigError
from ring_jax.rollout.types import SamplingParams
from ring_jax.scheduler import (Scheduler, SchedulerConfig, SchedulingPolicy, View,
                                register_policy)
from ring_jax.scheduler import policies, testing


@register_policy("test_trickle")
class Trickle(SchedulingPolicy):
    """Toy policy: admit ``groups_per_iteration`` new groups per iteration, and only while
    nothing is carried over; spend at most ``budget`` tokens per iteration; never purge. Every
    admitted response therefore finishes (paced, not purged), at most ``max_lag`` versions old."""

    params = {"groups_per_iteration": 1, "budget": 6, "max_lag": 8}

    def max_version_lag(self):
        return self.params["max_lag"]

    def token_budget(self, view):
        return self.params["budget"]

    def num_new_groups(self, view: View):
        return 0 if view.num_buffered else self.params["groups_per_iteration"]


@register_policy("test_trickle_background")
class BackgroundTrickle(Trickle):
    """The same answers, run on the producer thread ahead of the trainer."""

    background = True


def _config(**kw):
    base = dict(mode="test_trickle", group_size=2, batch_size=4, max_seq_len=40,
                sampling=SamplingParams(max_new_tokens=20), step_chunk_tokens=2,
                num_reward_workers=2)
    return SchedulerConfig(**{**base, **kw})


def _run(config, num_prompts=6, num_slots=2, updates_per_batch=1):
    engine = testing.FakeEngine(num_slots, lambda r: 1 + r.seed % 12)
    metrics = []
    with Scheduler(config, engine, testing.prompt_records(num_prompts),
                   lambda rec, req: (float(req.num_generated % 3), {}),
                   testing.grpo_advantages) as sched:
        batches = testing.run_training(sched, updates_per_batch=updates_per_batch,
                                       metrics=metrics)
        return batches, metrics, sched


def test_registered_toy_policy_runs_through_the_fake_engine():
    config = _config(policy_params=(("groups_per_iteration", 2),))
    batches, metrics, sched = _run(config)
    assert isinstance(sched.policy, Trickle) and sched.policy.params["budget"] == 6
    # Nothing purged: all 6 prompts x G=2 trained exactly once.
    assert not sched.purged_request_ids
    trained = sorted((int(g), int(i)) for b in batches
                     for g, i in zip(b["group_ids_B"], b["sample_index_B"]) if g >= 0)
    assert trained == [(g, i) for g in range(6) for i in range(2)]
    # The toy's budget, not C3PO++'s config default (16384), bounds every iteration.
    worst = max(m.get("rollout/tokens_generated_max_per_iteration", 0) for m in metrics)
    assert worst <= 6 + 2 - 1
    assert all(m.get("rollout/token_budget") in (None, 6.0) for m in metrics)
    # Carried work blocks admission: some responses spanned several versions, none was
    # older than the policy's bound.
    lags = [int(b["train_version"]) - b["versions_BT"][b["loss_mask_BT"] > 0].min()
            for b in batches]
    assert max(lags) <= 8
    assert sched.pop_metrics()["sched/total/carried_responses"] > 0


def test_background_toy_policy_finishes_carried_work_at_the_end():
    """On the producer thread too, with a token budget: responses still carried when the
    prompts run out are finished, not dropped."""
    batches, _, sched = _run(_config(mode="test_trickle_background"), updates_per_batch=1)
    assert not sched.purged_request_ids
    trained = sorted((int(g), int(i)) for b in batches
                     for g, i in zip(b["group_ids_B"], b["sample_index_B"]) if g >= 0)
    assert trained == [(g, i) for g in range(6) for i in range(2)]
    assert sched.pop_metrics()["sched/total/carried_responses"] > 0


@pytest.mark.parametrize("mode", ["test_trickle", "test_trickle_background"])
def test_same_config_same_schedule(mode):
    config = _config(mode=mode)
    first, _, _ = _run(config)
    second, _, _ = _run(config)
    assert len(first) == len(second)
    for a, b in zip(first, second):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_unknown_mode_names_the_registered_policies():
    with pytest.raises(ConfigError) as info:
        SchedulerConfig(mode="c3po++")
    message = str(info.value)
    assert message.startswith("mode='c3po++' is invalid: must be one of")
    for name in ("sync", "c3po", "async", "test_trickle"):
        assert repr(name) in message


def test_mode_by_module_path_without_registration():
    config = SchedulerConfig(mode=f"{__name__}:Trickle", group_size=2, batch_size=4)
    assert isinstance(config.make_policy(), Trickle)
    assert config.max_version_lag == 8
    with pytest.raises(ConfigError, match="mode='no_such_module:Policy' is invalid"):
        SchedulerConfig(mode="no_such_module:Policy")
    with pytest.raises(ConfigError, match="is invalid: must be one of"):
        SchedulerConfig(mode="numpy:ndarray")  # not a SchedulingPolicy


@pytest.mark.parametrize("params,message", [
    ((("groups_per_iteraton", 2),), "policy_params.groups_per_iteraton is not a parameter of "
                                    "policy 'test_trickle'; its parameters"),
    ((("budget", 2.5),), "policy_params.budget=2.5 is invalid: must be an int"),
    ((("budget", True),), "policy_params.budget=True is invalid: must be an int"),
])
def test_bad_policy_params_fail_with_the_field_name(params, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(policy_params=params)


def test_builtin_policies_keep_their_bounds():
    assert SchedulerConfig(mode="sync", group_size=2, batch_size=4).max_version_lag == 0
    assert SchedulerConfig(mode="c3po", sigma_max=3).max_version_lag == 3
    assert SchedulerConfig(mode="async", max_staleness=2).max_version_lag == 2
    assert [n for n in ("sync", "c3po", "async") if n in policies.names()] == [
        "sync", "c3po", "async"]
    with pytest.raises(ConfigError, match="already registered"):
        register_policy("c3po")(Trickle)


def test_c3po_purge_answer_is_the_sigma_max_rule():
    policy = SchedulerConfig(mode="c3po", sigma_max=1).make_policy()
    view = View(version=5, num_buffered=3, oldest_versions={0: 3, 1: 4, 2: 5})
    assert policy.groups_to_purge(view) == [0]  # lags 2, 1, 0: only lag 2 > σ_max = 1
