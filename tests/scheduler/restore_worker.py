"""Run by test_restore.py in a fresh process: restore a saved scheduler and continue training.

    python tests/scheduler/restore_worker.py MODE STATE.npz OUT.npz
"""
import sys

import numpy as np

from ring_jax.rollout.types import SamplingParams
from ring_jax.scheduler import Scheduler, SchedulerConfig
from ring_jax.scheduler import testing


def _length(request):
    rng = np.random.default_rng(request.seed)
    return int(rng.integers(20, 40)) if rng.random() < 0.3 else int(rng.integers(1, 6))


def _reward(record, request):
    return float(request.tokens.sum() % 5), {}


def build(mode):
    """The same scheduler, engine and prompt iterator in every process."""
    config = SchedulerConfig(
        mode=mode, group_size=2, batch_size=4, max_seq_len=48,
        sampling=SamplingParams(max_new_tokens=36), token_budget=10, sigma_max=1,
        purge_policy="requeue_prompt", max_active_requests=6, max_staleness=1,
        step_chunk_tokens=4, num_reward_workers=2, seed=3, expert_ids_shape=(1, 2))
    engine = testing.FakeEngine(3, _length, expert_ids_shape=(1, 2))
    prompts = testing.ListPromptIterator(testing.prompt_records(14, seed=1))
    return Scheduler(config, engine, prompts, _reward, testing.grpo_advantages)


def main(mode, state_path, out_path):
    with np.load(state_path) as f:
        state = {k: f[k] for k in f.files}
    with build(mode) as sched:
        sched.load_state_dict(state)
        sched.update_weights(None, sched.version)  # the trainer restores and re-publishes
        batches = testing.run_training(sched)
    np.savez(out_path, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()},
             num_batches=len(batches))


if __name__ == "__main__":
    main(*sys.argv[1:])
