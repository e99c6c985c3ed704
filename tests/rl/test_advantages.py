"""ring_jax.rl.advantages: hand-computed groups, degenerate groups, partial groups, layouts.

The estimator contract test iterates the registry (a new estimator is covered automatically);
a toy fork with a typed parameter, `scaled_dr_grpo`, is registered here."""
import math

import jax
import numpy as np
import pytest

from ring_jax import config as config_lib
from ring_jax.rl import advantages as adv_lib
from ring_jax.rl import registry
from ring_jax.train import experiment

TOY = "test_scaled_dr_grpo"


@adv_lib.register_estimator(TOY, params={"scale": registry.Param(float, 2.0, min_value=0.0)})
def scaled_dr_grpo(rewards_NG, valid_NG, cfg):
    """A toy fork: Dr.GRPO's R_i − mean(R), times ``scale``."""
    return adv_lib.dr_grpo(rewards_NG, valid_NG, cfg) * cfg.param("scale")

# Three groups of G=4: mixed, all-correct (degenerate), one-correct.
REWARDS = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]],
                   np.float32)
S3 = math.sqrt(3.0)


@pytest.mark.parametrize("estimator,expected", [
    # mean .5, population std .5; group 3: mean .25, std sqrt(.25·.75) = sqrt(3)/4.
    # (A sample-std bug would give ±0.866 in group 1.)
    ("grpo", [[1, -1, -1, 1], [0, 0, 0, 0], [-1 / S3, -1 / S3, -1 / S3, S3]]),
    ("dr_grpo", [[.5, -.5, -.5, .5], [0, 0, 0, 0], [-.25, -.25, -.25, .75]]),
    # leave-one-out baselines: group 1: 1/3 for a 1, 2/3 for a 0; group 3: 1/3 and 0.
    ("rloo", [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0, 0, 0, 0], [-1 / 3, -1 / 3, -1 / 3, 1]]),
])
def test_hand_computed_estimators(estimator, expected):
    out = adv_lib.compute_advantages(REWARDS, adv_lib.AdvantageConfig(estimator=estimator))
    np.testing.assert_allclose(np.asarray(out.advantages), expected, rtol=1e-5, atol=1e-6)
    assert np.asarray(out.keep).all()
    assert float(out.metrics["rl/degenerate_groups"]) == 1.0
    np.testing.assert_allclose(float(out.metrics["rl/degenerate_frac"]), 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(float(out.metrics["rl/reward_mean"]), 7 / 12, rtol=1e-6)


def test_sample_std_option():
    cfg = adv_lib.AdvantageConfig(estimator="grpo", std_ddof=1)
    out = adv_lib.compute_advantages(REWARDS[:1], cfg)
    # sample std of [1, 0, 0, 1] = sqrt(1/3).
    np.testing.assert_allclose(np.asarray(out.advantages)[0], np.array([1, -1, -1, 1]) * 0.5 * S3,
                               rtol=1e-5)


def test_drop_degenerate_and_batch_norm():
    cfg = adv_lib.AdvantageConfig(estimator="dr_grpo", drop_degenerate=True, batch_norm="std")
    out = adv_lib.compute_advantages(REWARDS, cfg)
    np.testing.assert_array_equal(np.asarray(out.keep), [[True] * 4, [False] * 4, [True] * 4])
    # Kept values [.5,-.5,-.5,.5,-.25,-.25,-.25,.75] have mean 0 and std sqrt(1.75/8); the
    # dropped group must not enter the std (with it: sqrt(1.75/12)).
    std = math.sqrt(1.75 / 8)
    expected = np.array([[.5, -.5, -.5, .5], [0, 0, 0, 0], [-.25, -.25, -.25, .75]]) / std
    np.testing.assert_allclose(np.asarray(out.advantages), expected, rtol=1e-5, atol=1e-6)


def test_batch_mean_std_normalisation_is_standardising():
    rewards = np.random.default_rng(0).random((5, 4)).astype(np.float32)
    cfg = adv_lib.AdvantageConfig(estimator="dr_grpo", batch_norm="mean_std")
    a = np.asarray(adv_lib.compute_advantages(rewards, cfg).advantages)
    np.testing.assert_allclose([a.mean(), a.std()], [0.0, 1.0], atol=1e-5)


def test_partial_groups_use_valid_members_only():
    rewards = np.array([[3.0, 1.0, 2.0, np.nan], [5.0, np.nan, np.nan, np.nan],
                        [np.nan] * 4], np.float32)
    valid = ~np.isnan(rewards)
    out = adv_lib.compute_advantages(rewards, adv_lib.AdvantageConfig(), valid)
    a = np.asarray(out.advantages)
    # Group 1 over 3 members: mean 2, std sqrt(2/3). Group 2 has one member: degenerate.
    s = math.sqrt(2 / 3)
    np.testing.assert_allclose(a, [[1 / s, -1 / s, 0, 0], [0] * 4, [0] * 4], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.keep), valid)
    # The empty third group is no group at all: 1 degenerate of 2.
    np.testing.assert_allclose(float(out.metrics["rl/degenerate_frac"]), 0.5)
    np.testing.assert_allclose(float(out.metrics["rl/reward_mean"]), 11 / 4)


def test_rloo_is_rescaled_dr_grpo_and_flat_layout_matches():
    rewards = np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32)
    rloo = adv_lib.compute_advantages(rewards, adv_lib.AdvantageConfig(estimator="rloo"))
    dr = adv_lib.compute_advantages(rewards, adv_lib.AdvantageConfig(estimator="dr_grpo"))
    np.testing.assert_allclose(np.asarray(rloo.advantages), 5 / 4 * np.asarray(dr.advantages),
                               rtol=1e-5, atol=1e-6)
    cfg = adv_lib.AdvantageConfig()
    flat = jax.jit(adv_lib.compute_advantages_flat, static_argnums=(1, 2))(
        rewards.reshape(-1), 5, cfg)
    grouped = adv_lib.compute_advantages(rewards, cfg)
    np.testing.assert_allclose(np.asarray(flat.advantages),
                               np.asarray(grouped.advantages).reshape(-1), rtol=1e-6)
    # GRPO advantages are standardised within each group.
    a = np.asarray(grouped.advantages)
    np.testing.assert_allclose(a.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(a.std(-1), 1, atol=1e-4)


def test_flat_layout_rejects_a_partial_group():
    with pytest.raises(ValueError, match="multiple of group_size"):
        adv_lib.compute_advantages_flat(np.zeros(7, np.float32), 4, adv_lib.AdvantageConfig())


@pytest.mark.parametrize("kwargs,field", [
    (dict(estimator="ppo"), "estimator"), (dict(batch_norm="z"), "batch_norm"),
    (dict(std_ddof=2), "std_ddof"), (dict(std_eps=-1.0), "std_eps"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(config_lib.ConfigError, match=field):
        adv_lib.AdvantageConfig(**kwargs)


@pytest.mark.parametrize("estimator", adv_lib.available_estimators())
def test_estimator_contract(estimator):
    """For every registered estimator: finite advantages on partial groups (NaN in the missing
    slots), 0 for missing members, groups independent of each other, and group-relative: a
    constant added to a group's rewards changes nothing."""
    rng = np.random.default_rng(2)
    rewards = rng.normal(size=(6, 4)).astype(np.float32)
    valid = rng.random((6, 4)) > 0.2
    rewards = np.where(valid, rewards, np.nan).astype(np.float32)
    cfg = adv_lib.AdvantageConfig(estimator=estimator)
    a = np.asarray(adv_lib.compute_advantages(rewards, cfg, valid).advantages)
    assert np.isfinite(a).all() and (a[~valid] == 0).all()
    halves = [np.asarray(adv_lib.compute_advantages(rewards[i:i + 3], cfg,
                                                    valid[i:i + 3]).advantages) for i in (0, 3)]
    np.testing.assert_allclose(np.concatenate(halves), a, rtol=1e-6)
    shifted = rewards + np.arange(6, dtype=np.float32)[:, None] * 3.0
    np.testing.assert_allclose(
        np.asarray(adv_lib.compute_advantages(shifted, cfg, valid).advantages), a,
        rtol=1e-4, atol=1e-5)


def test_toy_fork_with_a_typed_parameter():
    expected = np.array([[.5, -.5, -.5, .5], [0, 0, 0, 0], [-.25, -.25, -.25, .75]])
    for params, scale in (({}, 2.0), ({"scale": 3}, 3.0)):
        cfg = adv_lib.AdvantageConfig(estimator=TOY, estimator_params=params)
        assert cfg.estimator_params == (("scale", scale),)
        out = adv_lib.compute_advantages(REWARDS, cfg)
        np.testing.assert_allclose(np.asarray(out.advantages), scale * expected, rtol=1e-6)
    by_path = adv_lib.AdvantageConfig(estimator=f"{__name__}:scaled_dr_grpo")
    assert by_path.param("scale") == 2.0
    values = {"rl": {"advantage": {"estimator": TOY, "estimator_params": {"scale": "big"}}}}
    with pytest.raises(config_lib.ConfigError) as e:
        experiment.build(experiment.ExperimentConfig, values)
    assert str(e.value) == ("rl.advantage.estimator_params.scale='big' is invalid: must be a "
                            "float")


def test_registered_estimator_is_usable_by_name():
    name = "test_max_baseline"
    if name not in adv_lib.available_estimators():
        @adv_lib.register_estimator(name)
        def max_baseline(rewards_NG, valid_NG, cfg):
            del cfg
            return (rewards_NG - rewards_NG.max(-1, keepdims=True)) * valid_NG
    out = adv_lib.compute_advantages(REWARDS, adv_lib.AdvantageConfig(estimator=name))
    np.testing.assert_allclose(np.asarray(out.advantages),
                               [[0, -1, -1, 0], [0, 0, 0, 0], [-1, -1, -1, 0]])
