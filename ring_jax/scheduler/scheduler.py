"""The rollout scheduler's core loop, the same for every policy (`policies.py`).

One rollout *iteration* (PAPER §2):
  1. install the newest weights the trainer published (version v);
  2. purge the groups the policy names (C3PO++: oldest token more than σ_max versions behind v;
     ``purge_policy``: ``drop_group`` discards their responses, ``requeue_prompt`` also queues
     the prompt again, at most ``max_prompt_retries`` times, as a new group);
  3. resume the buffered unfinished responses first (oldest first), then admit the number of
     new prompts — whole groups of G requests — the policy asks for;
  4. generate: ``engine.step`` in chunks of ``step_chunk_tokens``; each finished response goes
     to the reward worker pool at once, so scoring overlaps generation; after every chunk the
     policy may admit more groups (C3PO++ refills freed capacity); stop once the policy's token
     budget Φ is spent (overshoot < ``engine.num_slots``) or, without a budget, once nothing is
     left;
  5. ``engine.drain()`` the unfinished responses into the buffer (cut counter += 1);
  6. join the rewards; every group whose G members are finished and scored gets its advantages
     (``advantage_fn``) and joins the ready queue, in group-id order.
``next_batch()`` pops B / G ready groups (checking that none is older than the policy's
`max_version_lag`), packs them into one fixed-shape batch (`batching.build_batch`) and returns
it.

Who drives: a foreground policy (sync, c3po) runs iterations on the caller's thread inside
``next_batch()`` whenever fewer than B responses are ready — step by step, no background thread
besides the reward pool, deterministic. A background policy (async) runs them on the producer
thread (`producer.py`), which also assembles batches ahead.

Staleness: a response reaches training only if ``trainer version - oldest token version`` is at
most the policy's `max_version_lag` (sync 0, c3po σ_max, async k); `next_batch` purges groups
that would break this (possible when one train step consumes less than one iteration's output)
and counts them; under a background policy such a group is dropped, never re-queued, so the
producer's schedule cannot depend on the trainer's timing.

Multi-host rule: every decision is a pure function of state all JAX processes share — the
config, counters, the prompt iterator (same seed everywhere), the engine's outputs (identical on
every process of an SPMD engine) and the rewards. Timing never changes a decision: rewards are
joined at the end of each iteration and groups complete in group-id order, and the producer is
gated on version counts, not clocks. A reward function that can differ across hosts (a sandbox
timing out on one host) must be made shared with ``broadcast_fn`` (e.g.
``jax.experimental.multihost_utils.broadcast_one_to_all``), applied to each iteration's rewards.

Errors: an exception in the engine, a reward worker, the producer or batch assembly closes the
scheduler (threads joined, pool stopped) and is re-raised in the caller of ``next_batch`` with
its original traceback; ``close()`` never hangs (worker threads are daemons joined with a
deadline).
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ring_jax.rollout.types import EngineProtocol
from ring_jax.scheduler import batching
from ring_jax.scheduler import metrics as metrics_lib
from ring_jax.scheduler import state as state_lib
from ring_jax.scheduler.config import SchedulerConfig
from ring_jax.scheduler.groups import Group
from ring_jax.scheduler.producer import POLL_S, Producer
from ring_jax.scheduler.rollouts import AdvantageFn, RewardFn, Rollouts

_CHECKED_HEADER = ("mode", "group_size", "batch_size")  # must match the config on restore


class Scheduler:
    """Schedules rollouts and hands the trainer fixed-shape batches of complete, scored groups.

    Args:
      config: the `SchedulerConfig` (``mode`` picks the policy).
      engine: anything implementing `ring_jax.rollout.types.EngineProtocol`.
      prompts: iterable of per-prompt records, each a dict with at least ``prompt_id`` (int)
        and ``prompt_tokens`` (int32 [P]) plus any other fields (task, answer, ...). The
        scheduler makes the G requests of each prompt itself. If the iterator has
        ``get_state()`` / ``set_state()`` its position is part of `state_dict()`.
      reward_fn: ``reward_fn(record, request) -> (reward, info)``, run on the worker pool; may be
        slow; an exception stops the scheduler. Numeric ``info`` values are averaged into the
        metrics as ``sched/reward_info/<key>``.
      advantage_fn: ``advantage_fn(rewards_G) -> advantages_G`` per complete group.
      broadcast_fn: optional ``f(rewards float32 [n]) -> [n]`` applied to each iteration's
        rewards before use (multi-host: take process 0's values).
      clock: seconds, for the timing metrics only.

    ``cond``, ``state``, ``engine``, ``policy``, ``closed``, ``failed``, ``fail``,
    ``rollout_iteration`` and ``assemble_ahead`` are for the producer thread (`producer.py`);
    the iteration itself is `rollouts.Rollouts`.
    """

    def __init__(self, config: SchedulerConfig, engine: EngineProtocol,
                 prompts: Iterable[dict[str, Any]], reward_fn: RewardFn,
                 advantage_fn: AdvantageFn, *,
                 broadcast_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.config = config
        self.policy = config.make_policy()
        self.engine = engine
        self._clock = clock
        self.cond = threading.Condition(threading.RLock())
        self._metrics = metrics_lib.Metrics()
        self._rollouts = Rollouts(config, self.policy, engine, iter(prompts), reward_fn,
                                  advantage_fn, broadcast_fn=broadcast_fn, clock=clock,
                                  cond=self.cond, metrics=self._metrics)
        # Runtime only (never checkpointed; see state_dict for the assembled batches).
        self._producer = Producer(self) if self.policy.background else None
        self._assembled: collections.deque[tuple[list[Group], dict[str, np.ndarray]]] = (
            collections.deque())  # batches the producer built ahead
        self._prefetch_batches = config.prefetch_batches if self.policy.background else 0
        self._error: BaseException | None = None
        self.closed = False
        self._last_return: float | None = None

    # ---------------------------------------------------------------- public API

    @property
    def version(self) -> int:
        """The newest policy version the trainer published."""
        return self.state.version

    @property
    def purged_request_ids(self) -> list[str]:
        """Ids of every response purged since construction (diagnostics, tests)."""
        return self._rollouts.purged_request_ids

    def update_weights(self, params: Any, version: int) -> None:
        """Publishes the trainer's new weights; the engine installs them at the next iteration
        boundary (never mid-iteration). Call it after every train step, and once after
        `load_state_dict` with the restored params and version."""
        with self.cond:
            if version < self.state.version:
                raise ValueError(f"update_weights: version {version} is older than the "
                                 f"published version {self.state.version}")
            self.state.version = int(version)
            if self._producer is not None:
                self._producer.publish(params, self.state.version)
            else:
                self._rollouts.pending_weights = (params, self.state.version)
            self.cond.notify_all()

    def next_batch(self) -> dict[str, np.ndarray]:
        """The next training batch (see `batching.build_batch`); StopIteration once the prompts
        are used up and everything is trained or purged (sticky), or after `close()`."""
        start = self._clock()
        try:
            with self.cond:
                groups, batch = self._take_batch()
                self._record_batch(groups, start)
            return batch
        except StopIteration:
            raise
        except BaseException as e:
            with self.cond:
                self.fail(e)  # later calls fail the same way instead of resuming
            self.close()
            raise

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            try:
                yield self.next_batch()
            except StopIteration:
                return

    def as_dataset(self, prefetch: int | None = None):
        """A grain IterDataset of batches whose iterator state is `state_dict()`
        (`batching.ScheduledBatchDataset`). ``prefetch`` overrides
        ``config.prefetch_batches`` (background policies only)."""
        if prefetch is not None:
            if prefetch and not self.policy.background:
                raise ValueError(f"prefetch={prefetch}: policy {self.config.mode!r} generates "
                                 "on the trainer's thread, so nothing can be built ahead")
            self._prefetch_batches = prefetch
        return batching.ScheduledBatchDataset(self)

    def pop_metrics(self) -> dict[str, float]:
        """Metrics accumulated since the last call (``sched/`` and ``rollout/`` prefixes)."""
        with self.cond:
            s = self.state
            return metrics_lib.summarize(
                self._metrics.pop(), s.totals, version=s.version, buffer_size=len(s.buffer),
                pending_groups=len(s.groups),
                ready_groups=len(s.ready) + sum(len(g) for g, _ in self._assembled))

    def close(self) -> None:
        """Stops the producer and the reward pool; idempotent, never hangs."""
        with self.cond:
            if self.closed:
                return
            self.closed = True
            self.cond.notify_all()
        if self._producer is not None:
            self._producer.join()
        self._rollouts.close()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, np.ndarray]:
        """The exact scheduler state (`state.SchedulerState`) as a flat dict of numpy arrays.

        Taken at an iteration boundary, so nothing is in the engine or the reward pool; under a
        background policy it first waits until the producer is blocked on weights not yet
        published, and batches it assembled ahead are saved as the ready groups they were made
        of. Batches already returned by `next_batch` are the trainer's.
        """
        with self.cond:
            if self._producer is not None:
                self._producer.wait_idle()
            self._raise_error()
            get_state = getattr(self._rollouts.prompts, "get_state", None)
            assembled = [g for groups, _ in self._assembled for g in groups]
            state = dataclasses.replace(
                self.state, ready=collections.deque([*assembled, *self.state.ready]),
                prompt_iterator=get_state() if get_state is not None else None)
            header = {key: getattr(self.config, key) for key in _CHECKED_HEADER}
            return state_lib.encode({**header, **state.to_tree()})

    def load_state_dict(self, flat: dict[str, Any]) -> None:
        """Restores `state_dict()` output; call before the first `next_batch`, then
        `update_weights(params, version)` with the restored weights."""
        tree = state_lib.decode(flat)
        with self.cond:
            started = self._producer is not None and self._producer.started
            if started or self.state.iteration or self.state.batches_emitted:
                raise RuntimeError("load_state_dict must be called on a fresh Scheduler")
            for key in _CHECKED_HEADER:
                if tree[key] != getattr(self.config, key):
                    raise ValueError(f"scheduler state has {key}={tree[key]!r} but the config "
                                     f"has {getattr(self.config, key)!r}")
            self._rollouts.state = state_lib.SchedulerState.from_tree(tree)
            if self.state.prompt_iterator is not None:
                set_state = getattr(self._rollouts.prompts, "set_state", None)
                if set_state is None:
                    raise ValueError("the scheduler state holds a prompt-iterator position but "
                                     "this prompt iterator has no set_state()")
                set_state(self.state.prompt_iterator)

    # ---------------------------------------------------------------- for the producer

    @property
    def state(self) -> state_lib.SchedulerState:
        """The live checkpointable state (read and changed with ``cond`` held)."""
        return self._rollouts.state

    def rollout_iteration(self) -> bool:
        """One rollout iteration (`Rollouts.run_iteration`); False when nothing was left."""
        return self._rollouts.run_iteration(install_weights=self._producer is None)

    def assemble_ahead(self) -> None:
        """Builds up to ``prefetch_batches`` full batches from the ready queue (``cond`` held)."""
        need = self.config.prompts_per_batch
        ready = self.state.ready
        while len(self._assembled) < self._prefetch_batches and len(ready) >= need:
            groups = [ready.popleft() for _ in range(need)]
            self._assembled.append((groups, batching.build_batch(groups, self.config)))

    # ---------------------------------------------------------------- batches

    def _take_batch(self) -> tuple[list[Group], dict[str, np.ndarray]]:
        """One batch worth of ready groups and their batch, driving rollouts (or waiting)."""
        need = self.config.prompts_per_batch
        ready = self.state.ready
        while True:
            self._raise_error()
            if self.closed:
                raise StopIteration
            if self._assembled:
                # A batch built ahead is used only if it is what this call would build now:
                # none of the groups built ahead has gone stale since; else they go back.
                if not any(self._is_stale(g) for groups, _ in self._assembled for g in groups):
                    self._purge_stale_ready()
                    return self._assembled.popleft()
                for groups, _ in reversed(self._assembled):
                    ready.extendleft(reversed(groups))
                self._assembled.clear()
            self._purge_stale_ready()
            if len(ready) >= need:
                groups = [ready.popleft() for _ in range(need)]
                return groups, batching.build_batch(groups, self.config)
            if self._rollouts_done():
                if ready:  # a final, partial batch (its padding rows have no loss)
                    groups = [ready.popleft() for _ in range(len(ready))]
                    return groups, batching.build_batch(groups, self.config)
                raise StopIteration
            if self._producer is not None:
                self._producer.ensure_started()
                self.cond.wait(POLL_S)
            else:
                self.rollout_iteration()

    def _rollouts_done(self) -> bool:
        if self._producer is not None:
            return self._producer.done
        return self._rollouts.done

    def _is_stale(self, group: Group) -> bool:
        oldest = group.oldest_version()
        return oldest is not None and self.state.version - oldest > self.policy.max_version_lag()

    def _purge_stale_ready(self) -> None:
        for group in [g for g in self.state.ready if self._is_stale(g)]:
            self.state.ready.remove(group)
            # Background: the producer runs ahead on its own thread, so a prompt re-queued here
            # would be picked up at a timing-dependent iteration; such groups are dropped.
            self._rollouts.purge_group(group, "stale_at_batch",
                                       requeue=not self.policy.background)

    def _record_batch(self, groups: list[Group], start: float) -> None:
        now = self._clock()
        self._metrics.add("sched/trainer_wait_s", now - start)
        if self._last_return is not None:
            self._metrics.add("sched/end_to_end_s", now - self._last_return)
        self._last_return = now
        self.state.batches_emitted += 1
        metrics_lib.record_batch(self._metrics, groups, self.state.version)
        self.state.totals["trained_responses"] += sum(g.size for g in groups)
        self.state.totals["trained_groups"] += len(groups)

    # ---------------------------------------------------------------- errors

    @property
    def failed(self) -> bool:
        return self._error is not None

    def fail(self, error: BaseException) -> None:
        """Records the first error (call with ``cond`` held); it is re-raised by every later
        `next_batch`."""
        if self._error is None:
            self._error = error
        self.cond.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error
