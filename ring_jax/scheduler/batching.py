"""Complete groups → fixed-shape training batches, and the grain view of the scheduler.

Every batch has the same shapes ([B, T] rows, one response per row, 0-padded), so the train step
compiles once and each step sees the same token budget B·T (C3PO's fixed per-step budget).

Row layout for a prompt of P tokens and a response of R tokens (P + R ≤ T):
  tokens_BT[b]      = prompt ‖ response ‖ 0…
  targets_BT[b, t]  = tokens_BT[b, t + 1]  (0 at t = T - 1)
  loss_mask_BT[b,t] = 1.0 for t in [P - 1, P + R - 1): targets_BT[b, t] is response token t-P+1
  logp_infer_BT / versions_BT carry the engine's record of that target token (0 / -1 elsewhere)
  expert_ids_BTLK[b, t] = routing of the forward whose input is tokens_BT[b, t]; response token i
                    was sampled by the forward at input position P + i - 1, so it lands at the
                    same t as its target; prompt and padding positions get -1 ("use the
                    trainer's own routing").
Extra per-row fields: advantages_B, rewards_B, group_ids_B, sample_index_B (-1 on padding rows of
a final partial batch, whose loss_mask is all zero).
"""
from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np

from ring_jax.scheduler.config import SchedulerConfig
from ring_jax.scheduler.groups import Group


def build_batch(groups: Sequence[Group], config: SchedulerConfig) -> dict[str, np.ndarray]:
    """Packs whole complete groups into one [B, T] batch (padding rows if fewer than B)."""
    B, T = config.batch_size, config.max_seq_len
    batch = {
        "tokens_BT": np.zeros((B, T), np.int32),
        "targets_BT": np.zeros((B, T), np.int32),
        "loss_mask_BT": np.zeros((B, T), np.float32),
        "logp_infer_BT": np.zeros((B, T), np.float32),
        "versions_BT": np.full((B, T), -1, np.int32),
        "advantages_B": np.zeros((B,), np.float32),
        "rewards_B": np.zeros((B,), np.float32),
        "group_ids_B": np.full((B,), -1, np.int32),
        "sample_index_B": np.full((B,), -1, np.int32),
    }
    if config.expert_ids_shape is not None:
        batch["expert_ids_BTLK"] = np.full((B, T, *config.expert_ids_shape), -1, np.int32)
    rows = [(g, i) for g in groups for i in range(g.size)]
    if len(rows) > B:
        raise ValueError(f"{len(rows)} responses do not fit a batch of {B} rows")
    for b, (group, i) in enumerate(rows):
        request = group.members[i]
        prompt = np.asarray(request.prompt_tokens, np.int32)
        P, R = prompt.shape[0], request.num_generated
        if P + R > T:
            raise ValueError(f"request {request.request_id}: prompt {P} + response {R} tokens "
                             f"exceed max_seq_len={T}")
        batch["tokens_BT"][b, :P] = prompt
        batch["tokens_BT"][b, P:P + R] = request.tokens
        batch["targets_BT"][b, :T - 1] = batch["tokens_BT"][b, 1:]
        span = slice(P - 1, P + R - 1)
        batch["loss_mask_BT"][b, span] = 1.0
        batch["logp_infer_BT"][b, span] = request.logprobs
        batch["versions_BT"][b, span] = request.versions
        if config.expert_ids_shape is not None and request.expert_ids is not None:
            batch["expert_ids_BTLK"][b, span] = request.expert_ids
        batch["advantages_B"][b] = group.advantages[i]
        batch["rewards_B"][b] = group.rewards[i]
        batch["group_ids_B"][b] = group.group_id
        batch["sample_index_B"][b] = i
    return batch


class _BatchIterator(grain.DatasetIterator):
    """Pulls batches from the scheduler; sticky StopIteration once it is exhausted or closed.

    Its grain state is the scheduler's checkpoint (`Scheduler.state_dict`): restoring it with
    `set_state` on a fresh scheduler's iterator continues with exactly the next batch.
    """

    def __init__(self, scheduler: Any):
        super().__init__()
        self._scheduler = scheduler
        self._done = False

    def __next__(self) -> dict[str, np.ndarray]:
        if self._done:
            raise StopIteration
        try:
            return self._scheduler.next_batch()
        except StopIteration:
            self._done = True
            raise

    def get_state(self) -> dict[str, np.ndarray]:
        return self._scheduler.state_dict()

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self._scheduler.load_state_dict(state)


class ScheduledBatchDataset(grain.IterDataset):
    """A grain IterDataset over the scheduler's queue of complete groups, emitting fixed-shape
    batches (`build_batch`).

    Prefetch: a background policy (async) assembles up to ``prefetch_batches`` batches ahead
    on its producer thread, and `Scheduler.state_dict` saves them as the ready groups they were
    made of, so the iterator state stays an exact cut. grain's own `ThreadPrefetchIterDataset`
    is not used: its state is the parent's state when an element was *produced*, which here
    would be a scheduler cut taken against weights the trainer has not yet published (not
    resumable exactly); and under a foreground policy (sync, c3po) a prefetch thread would run
    the next rollout iteration before the new weights arrive.
    """

    def __init__(self, scheduler: Any):
        super().__init__()
        self._scheduler = scheduler

    def __iter__(self) -> _BatchIterator:
        return _BatchIterator(self._scheduler)
