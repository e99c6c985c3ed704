"""C3PO++ and synchronous rollout schedulers (host-side threads, buffers, staleness, budget).

    from ring_jax.scheduler import Scheduler, SchedulerConfig
    sched = Scheduler(SchedulerConfig(mode="c3po", ...), engine, prompts, reward_fn, adv_fn)
    for batch in sched.as_dataset():          # or sched.next_batch()
        params, version = train_step(...)
        sched.update_weights(params, version)
    state = sched.state_dict()                # flat dict of numpy arrays for the checkpoint

See `scheduler.py` for the iteration, staleness, multi-host and error rules, `batching.py` for
the batch layout, `testing.py` for the fake engine.
"""
from ring_jax.scheduler.batching import ScheduledBatchDataset, build_batch, make_dataset
from ring_jax.scheduler.config import SchedulerConfig
from ring_jax.scheduler.scheduler import Scheduler, derive_seed

__all__ = ["Scheduler", "SchedulerConfig", "ScheduledBatchDataset", "build_batch",
           "make_dataset", "derive_seed"]
