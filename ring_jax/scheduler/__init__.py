"""Rollout scheduling (host-side threads, buffers, staleness, budget): sync, C3PO++ (purging or
paced) and async policies around one core loop.

    from ring_jax.scheduler import Scheduler, SchedulerConfig
    sched = Scheduler(SchedulerConfig(mode="c3po", ...), engine, prompts, reward_fn, adv_fn)
    batches = iter(sched.as_dataset())        # grain; or sched.next_batch()
    for batch in batches:
        params, version = train_step(...)
        sched.update_weights(params, version)
    state = batches.get_state()               # = sched.state_dict(): flat numpy arrays

Modules, one job each:
  scheduler.py  the public `Scheduler`: batches, weights, state_dict; the iteration,
                staleness, multi-host and error rules
  rollouts.py   one rollout iteration (purge, admit, generate, drain, score, group)
  policies.py   the policy protocol + registry (sync, c3po, paced, async; a fork adds one
                class)
  producer.py   the producer thread of background policies (async)
  state.py      `SchedulerState` (the checkpoint) and its flat numpy encoding
  groups.py     a GRPO group of G requests;   batching.py  fixed-shape batches + grain view
  metrics.py    what is recorded when;         workers.py   the reward thread pool
  config.py     `SchedulerConfig`;             testing.py   the fake engine for tests
"""
from ring_jax.scheduler.batching import ScheduledBatchDataset, build_batch
from ring_jax.scheduler.config import SchedulerConfig
from ring_jax.scheduler.policies import SchedulingPolicy, View, register_policy
from ring_jax.scheduler.rollouts import derive_seed
from ring_jax.scheduler.scheduler import Scheduler

__all__ = ["Scheduler", "SchedulerConfig", "ScheduledBatchDataset", "SchedulingPolicy", "View",
           "build_batch", "derive_seed", "register_policy"]
