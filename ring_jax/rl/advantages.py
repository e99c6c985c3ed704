"""Group-relative advantages (PAPER §1, "Â: group-relative advantage").

Rewards come as [N, G]: N groups (prompts) of G responses each. Per group:

    grpo     Â_i = (R_i − mean(R)) / (std(R) + eps)        (GRPO; the paper's Â)
    dr_grpo  Â_i = R_i − mean(R)                            (Dr.GRPO: no std division)
    rloo     Â_i = R_i − mean_{j≠i} R_j = G/(G−1) (R_i − mean(R))   (leave-one-out baseline)

A *degenerate* group (all its rewards equal: all correct or all wrong) carries no learning
signal; its advantages are exactly 0 and it is counted (`rl/degenerate_frac`). With
``drop_degenerate`` its members are also flagged in ``keep`` so the trainer can leave them
out of the batch (and out of the loss denominator).

``valid_NG`` marks members that exist: a group that lost members (e.g. a C3PO++ response purged
after σ_max cuts) is normalised over the members it has; missing members get Â = 0 and
keep = False. Optional batch-level normalisation (``batch_norm``) rescales the group advantages
by the std (and optionally subtracts the mean) over all kept members of the batch.

The estimator is a registered function (STYLE.md "Forking") with the hyper-parameters it
reads, typed (`ring_jax.rl.registry`), checked against ``AdvantageConfig.estimator_params`` when
the config is built:

    @advantages.register_estimator("my_adv", params={"temperature": registry.Param(float, 1.0)})
    def my_adv(rewards_NG, valid_NG, cfg): ... cfg.param("temperature") ...

``estimator`` may also be ``"module.path:function"`` (the module is imported).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from ring_jax import config as config_lib
from ring_jax.rl import registry

BATCH_NORMS = ("none", "std", "mean_std")

# fn(rewards_NG, valid_NG, cfg) -> advantages_NG; groups with fewer than 2 valid members or
# equal rewards are zeroed by the caller, so estimators may ignore them.
EstimatorFn = Callable[[jax.Array, jax.Array, "AdvantageConfig"], jax.Array]
_ESTIMATORS = registry.Registry("advantage estimator", "estimator")


def register_estimator(name: str, params: Mapping[str, Any] | None = None
                       ) -> Callable[[EstimatorFn], EstimatorFn]:
    """Registers ``fn(rewards_NG, valid_NG, cfg) -> advantages_NG`` as ``estimator=name``;
    ``params``: the hyper-parameters it reads with ``cfg.param(key)`` (as in
    `losses.register_correction`)."""
    return _ESTIMATORS.register(name, params)


def available_estimators() -> tuple[str, ...]:
    return _ESTIMATORS.names()


def get_estimator(name: str) -> EstimatorFn:
    """The function of a registered or ``"module.path:function"`` estimator name."""
    return _ESTIMATORS.get(name).fn


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    """How advantages are computed from a batch of group rewards.

    Fields:
      estimator: "grpo" | "dr_grpo" | "rloo", another registered name, or
        "module.path:function".
      estimator_params: the hyper-parameters the estimator declared at registration, a mapping
        read with `param`; checked and completed with defaults when built (as
        `LossConfig.correction_params`).
      std_eps: eps in (R − mean) / (std + eps).
      std_ddof: 0 = population std (the paper's formula), 1 = sample std (TRL / verl).
      drop_degenerate: flag members of equal-reward groups as not kept.
      batch_norm: "none" | "std" (divide by the batch std) | "mean_std" (also subtract the
        batch mean), over all kept members, after the group step.
      batch_norm_eps: eps of the batch-level std division.
    """

    estimator: str = "grpo"
    std_eps: float = 1e-6
    std_ddof: int = 0
    drop_degenerate: bool = False
    batch_norm: str = "none"
    batch_norm_eps: float = 1e-6
    estimator_params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        config_lib.check(isinstance(self.estimator, str), "estimator", self.estimator,
                         "must be a str")
        # Frozen: the resolved (sorted, defaults filled) parameters replace the given ones.
        object.__setattr__(self, "estimator_params", _ESTIMATORS.resolve_params(
            self.estimator, self.estimator_params, "estimator_params"))
        config_lib.check_float("std_eps", self.std_eps, min_value=0.0)
        config_lib.check_int("std_ddof", self.std_ddof, min_value=0, max_value=1)
        config_lib.check(isinstance(self.drop_degenerate, bool), "drop_degenerate",
                         self.drop_degenerate, "must be a bool")
        config_lib.check_one_of("batch_norm", self.batch_norm, BATCH_NORMS)
        config_lib.check_float("batch_norm_eps", self.batch_norm_eps, min_value=0.0)

    def param(self, key: str) -> Any:
        """The value of the estimator's declared parameter ``key`` (default filled in)."""
        return registry.param_value(self.estimator_params, key, "advantage estimator",
                                    self.estimator)


class Advantages(NamedTuple):
    """Per member ([N, G], or [B] from `compute_advantages_flat`)."""

    advantages: jax.Array  # float32; 0 for degenerate groups and missing members
    keep: jax.Array  # bool: the member exists (and, with drop_degenerate, its group is not
    #                  degenerate); the trainer multiplies the member's response mask by it
    metrics: dict[str, jax.Array]


def _group_mean(rewards_NG: jax.Array, valid_NG: jax.Array) -> jax.Array:
    count_N1 = jnp.maximum(valid_NG.sum(-1, keepdims=True), 1.0)
    return (rewards_NG * valid_NG).sum(-1, keepdims=True) / count_N1


@register_estimator("grpo")
def grpo(rewards_NG: jax.Array, valid_NG: jax.Array, cfg: AdvantageConfig) -> jax.Array:
    """GRPO (DeepSeekMath): (R_i − mean(R)) / (std(R) + eps) within the group."""
    centered_NG = (rewards_NG - _group_mean(rewards_NG, valid_NG)) * valid_NG
    dof_N1 = jnp.maximum(valid_NG.sum(-1, keepdims=True) - cfg.std_ddof, 1.0)
    std_N1 = jnp.sqrt(jnp.square(centered_NG).sum(-1, keepdims=True) / dof_N1)
    return centered_NG / (std_N1 + cfg.std_eps)


@register_estimator("dr_grpo")
def dr_grpo(rewards_NG: jax.Array, valid_NG: jax.Array, cfg: AdvantageConfig) -> jax.Array:
    """Dr.GRPO (Liu et al. 2025): R_i − mean(R); no std division (it biases toward easy and
    hard prompts)."""
    del cfg
    return (rewards_NG - _group_mean(rewards_NG, valid_NG)) * valid_NG


@register_estimator("rloo")
def rloo(rewards_NG: jax.Array, valid_NG: jax.Array, cfg: AdvantageConfig) -> jax.Array:
    """RLOO (Ahmadian et al. 2024): R_i − mean of the other members' rewards."""
    del cfg
    count_N1 = valid_NG.sum(-1, keepdims=True)
    total_N1 = (rewards_NG * valid_NG).sum(-1, keepdims=True)
    baseline_NG = (total_N1 - rewards_NG) / jnp.maximum(count_N1 - 1.0, 1.0)
    return (rewards_NG - baseline_NG) * valid_NG


def compute_advantages(rewards_NG: jax.Array, cfg: AdvantageConfig,
                       valid_NG: jax.Array | None = None) -> Advantages:
    """Advantages of a batch of groups; see the module docstring. Jittable (cfg static)."""
    rewards_NG = rewards_NG.astype(jnp.float32)
    valid_NG = (jnp.ones(rewards_NG.shape, bool) if valid_NG is None
                else valid_NG.astype(bool))
    valid_f_NG = valid_NG.astype(jnp.float32)
    # Degenerate: fewer than two members, or all valid members' rewards equal.
    big = jnp.finfo(jnp.float32).max
    hi_N = jnp.where(valid_NG, rewards_NG, -big).max(-1)
    lo_N = jnp.where(valid_NG, rewards_NG, big).min(-1)
    has_group_N = valid_NG.sum(-1) > 0
    degenerate_N = has_group_N & ((valid_NG.sum(-1) < 2) | (hi_N == lo_N))
    safe_rewards_NG = jnp.where(valid_NG, rewards_NG, 0.0)  # NaN/garbage in missing slots
    adv_NG = get_estimator(cfg.estimator)(safe_rewards_NG, valid_f_NG, cfg)
    adv_NG = jnp.where(valid_NG & ~degenerate_N[:, None], adv_NG, 0.0)

    keep_NG = valid_NG
    if cfg.drop_degenerate:
        keep_NG = keep_NG & ~degenerate_N[:, None]
    if cfg.batch_norm != "none":
        keep_f_NG = keep_NG.astype(jnp.float32)
        count = jnp.maximum(keep_f_NG.sum(), 1.0)
        mean = (adv_NG * keep_f_NG).sum() / count
        std = jnp.sqrt((jnp.square(adv_NG - mean) * keep_f_NG).sum() / count)
        shift = mean if cfg.batch_norm == "mean_std" else 0.0
        adv_NG = jnp.where(keep_NG, (adv_NG - shift) / (std + cfg.batch_norm_eps), 0.0)

    num_groups = jnp.maximum(has_group_N.sum(), 1).astype(jnp.float32)
    num_valid = jnp.maximum(valid_f_NG.sum(), 1.0)
    metrics = {
        "rl/reward_mean": (safe_rewards_NG * valid_f_NG).sum() / num_valid,
        "rl/degenerate_groups": degenerate_N.sum().astype(jnp.float32),
        "rl/degenerate_frac": degenerate_N.sum() / num_groups,
        "rl/adv_abs_mean": (jnp.abs(adv_NG) * keep_NG).sum() / jnp.maximum(keep_NG.sum(), 1),
    }
    return Advantages(adv_NG, keep_NG, metrics)


def compute_advantages_flat(rewards_B: jax.Array, group_size: int, cfg: AdvantageConfig,
                            valid_B: jax.Array | None = None) -> Advantages:
    """`compute_advantages` for rewards laid out flat, each group's G members contiguous
    ([B] = [N·G]); results come back flat ([B])."""
    config_lib.check_int("group_size", group_size, min_value=1)
    if rewards_B.shape[0] % group_size:
        raise ValueError(f"batch {rewards_B.shape[0]} is not a multiple of group_size "
                         f"{group_size}")
    shape_NG = (rewards_B.shape[0] // group_size, group_size)
    valid_NG = None if valid_B is None else valid_B.reshape(shape_NG)
    out = compute_advantages(rewards_B.reshape(shape_NG), cfg, valid_NG)
    return Advantages(out.advantages.reshape(-1), out.keep.reshape(-1), out.metrics)
