"""`SchedulerConfig`: how rollouts are scheduled between the engine, the reward workers and the
trainer (PAPER §2, C3PO++).

``mode`` names a registered scheduling policy (`policies.py`; a forker's own policy by its
registered name or ``"package.module:ClassName"``). The built-in ones:
  * ``sync``  — the baseline: each iteration admits ``batch_size // group_size`` prompts, runs
    every response to completion, scores them, and yields exactly one training batch.
  * ``c3po``  — C3PO++: each iteration spends a budget Φ = ``token_budget`` of new tokens;
    unfinished responses are drained into a buffer and resumed first next iteration under the
    newest weights. A group whose oldest token is more than σ_max = ``sigma_max`` policy versions
    behind the current one is purged (``purge_policy``). New prompts fill the capacity
    ``max_active_requests`` that the buffer leaves free.
  * ``paced`` — C3PO++'s budget Φ and carry-over, but nothing is purged: admission is paced
    so that every admitted response is trained within σ_max versions however long it is (a cap
    on the groups admitted and not yet trained, `policies.Paced`), which keeps the trained
    responses' length distribution that of ``sync``. ``policy_params``: ``versions_per_batch``
    (default 1, the versions the trainer publishes per batch).
  * ``async`` — k-step off-policy overlap: a background thread generates batch n (run to
    completion, as ``sync``) with the weights of version ``v0 + n - max_staleness`` while the
    trainer trains batch n - 1; the trainer never sees a token more than ``max_staleness``
    versions old. Up to ``prefetch_batches`` batches are assembled ahead on that thread.
A policy's own settings go in ``policy_params`` (validated against what the policy declares).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ring_jax import config as config_lib
from ring_jax.rollout.types import SamplingParams
from ring_jax.scheduler import policies

PURGE_POLICIES = ("drop_group", "requeue_prompt")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Scheduler settings; validated before anything runs.

    σ here counts the policy versions a response's oldest token lags behind the weights it is
    resumed (or trained) with. In the paper's regime of one train step per rollout iteration this
    is exactly the number of times the response was cut; counting versions instead of cuts makes
    σ_max a hard staleness bound however many iterations a train step needs.
    """

    mode: str = "c3po"  # a registered policy (`policies.names()`) or "package.module:Class"
    policy_params: tuple[tuple[str, Any], ...] = ()  # (name, value) pairs of the policy's params
    group_size: int = 8  # G: responses per prompt; a group trains only when all G are scored
    batch_size: int = 64  # B rows (one response each) per training batch; a multiple of G
    max_seq_len: int = 1024  # T: prompt + response fit in one row
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    # c3po
    token_budget: int = 16384  # Φ: new tokens generated per rollout iteration
    sigma_max: int = 2  # σ_max: most policy versions a trained token may lag
    purge_policy: str = "drop_group"
    max_prompt_retries: int = 1  # requeue_prompt: times one prompt may be re-queued
    max_active_requests: int = 256  # c3po: buffered + newly admitted requests per iteration
    # async
    max_staleness: int = 1  # k: batch n is generated with weights v0 + n - k
    # background policies (async): complete batches the producer assembles ahead of the
    # trainer; policies that generate on the trainer's thread (sync, c3po) assemble none ahead.
    prefetch_batches: int = 1
    # Engine.step is called in chunks of this many tokens so finished responses go to the reward
    # workers while the engine keeps generating, and (c3po) new prompts refill the capacity
    # they free (0: one step call per iteration).
    step_chunk_tokens: int = 1024
    num_reward_workers: int = 4
    seed: int = 0  # request sampling seeds are derived from (seed, group id, sample index)
    # (L_moe, K) when the engine records routed experts; batches then carry expert_ids_BTLK.
    expert_ids_shape: tuple[int, int] | None = None

    def __post_init__(self):
        policy_cls = policies.get_policy_class(self.mode)  # checks the mode's name
        policies.check_params(self.mode, policy_cls, self.policy_params)
        config_lib.check_int("group_size", self.group_size, min_value=1)
        config_lib.check_int("batch_size", self.batch_size, min_value=1)
        config_lib.check(self.batch_size % self.group_size == 0, "batch_size", self.batch_size,
                         f"must be a multiple of group_size={self.group_size} (groups never "
                         "straddle two batches)")
        config_lib.check_int("max_seq_len", self.max_seq_len, min_value=2)
        config_lib.check(isinstance(self.sampling, SamplingParams), "sampling", self.sampling,
                         "must be a ring_jax.rollout.types.SamplingParams")
        config_lib.check_int("token_budget", self.token_budget, min_value=1)
        config_lib.check_int("sigma_max", self.sigma_max, min_value=0)
        config_lib.check_one_of("purge_policy", self.purge_policy, PURGE_POLICIES)
        config_lib.check_int("max_prompt_retries", self.max_prompt_retries, min_value=0)
        config_lib.check_int("max_active_requests", self.max_active_requests,
                             min_value=self.group_size)
        config_lib.check_int("max_staleness", self.max_staleness, min_value=1)
        config_lib.check_int("prefetch_batches", self.prefetch_batches, min_value=0)
        config_lib.check_int("step_chunk_tokens", self.step_chunk_tokens, min_value=0)
        config_lib.check_int("num_reward_workers", self.num_reward_workers, min_value=1)
        config_lib.check_int("seed", self.seed, min_value=0)
        if self.expert_ids_shape is not None:
            shape = tuple(self.expert_ids_shape)
            config_lib.check(len(shape) == 2 and all(isinstance(n, int) and n >= 1
                                                     for n in shape),
                             "expert_ids_shape", self.expert_ids_shape,
                             "must be None or (L_moe, K) with positive ints")
        policy_cls.validate(self)

    @property
    def prompts_per_batch(self) -> int:
        return self.batch_size // self.group_size

    def make_policy(self) -> policies.SchedulingPolicy:
        """The `policies.SchedulingPolicy` named by ``mode``, configured by this config."""
        return policies.get_policy_class(self.mode)(self)

    @property
    def max_version_lag(self) -> int:
        """Most versions a trained token may lag the trainer's weights, by construction."""
        return self.make_policy().max_version_lag()
