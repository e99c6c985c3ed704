"""The rollout scheduler: sync baseline, C3PO++ token-budgeted partial rollouts, k-step async.

One rollout *iteration* (PAPER §2):
  1. install the newest weights the trainer published (version v);
  2. c3po: purge every group whose oldest token is more than σ_max versions behind v
     (``drop_group``: its responses are discarded; ``requeue_prompt``: and its prompt is queued
     again, at most ``max_prompt_retries`` times, as a new group);
  3. resume the buffered unfinished responses first (oldest first), then admit new prompts —
     whole groups of G requests — into the capacity left (c3po: ``max_active_requests``
     requests in flight, topped up again after every chunked step call as responses finish;
     sync/async: one batch worth of prompts);
  4. generate: ``engine.step`` in chunks of ``step_chunk_tokens``; each finished response goes
     to the reward worker pool at once, so scoring overlaps generation; c3po stops once Φ new
     tokens are spent (overshoot < ``engine.num_slots``), sync/async once nothing is left;
  5. c3po: ``engine.drain()`` the unfinished responses into the buffer (cut counter += 1);
  6. join the rewards; every group whose G members are finished and scored gets its advantages
     (``advantage_fn``) and joins the ready queue, in group-id order.
``next_batch()`` pops B / G ready groups (checking that none is older than the bound below),
packs them into one fixed-shape batch (`batching.build_batch`) and returns it.

Who drives: in ``sync`` and ``c3po`` the caller's thread runs iterations inside ``next_batch()``
whenever fewer than B responses are ready — step by step, no background thread besides the
reward pool, deterministic. In ``async`` a producer thread generates batch n with the weights of
version v0 + max(0, n - k) and blocks until the trainer has published them (``update_weights``),
so generation of the next batches overlaps training and the ready queue stays bounded (≤ k + 1
batches ahead).

Staleness: a response reaches training only if ``trainer version - oldest token version`` is at
most 0 (sync), σ_max (c3po) or k (async); `next_batch` purges groups that would break this
(possible when one train step consumes less than one iteration's output) and counts them; in
async mode such a group is dropped, never re-queued, so the producer's schedule cannot depend
on the trainer's timing.

Multi-host rule: every decision is a pure function of state all JAX processes share — the
config, counters, the prompt iterator (same seed everywhere), the engine's outputs (identical on
every process of an SPMD engine) and the rewards. Timing never changes a decision: rewards are
joined at the end of each iteration and groups complete in group-id order, and the async producer
is gated on version counts, not clocks. A reward function that can differ across hosts (a sandbox
timing out on one host) must be made shared with ``broadcast_fn`` (e.g.
``jax.experimental.multihost_utils.broadcast_one_to_all``), applied to each iteration's rewards.

Errors: an exception in the engine, a reward worker, the async producer or batch assembly closes
the scheduler (threads joined, pool stopped) and is re-raised in the caller of ``next_batch``
with its original traceback; ``close()`` never hangs (worker threads are daemons joined with a
deadline).
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ring_jax.rollout.types import EngineProtocol, Request
from ring_jax.scheduler import batching
from ring_jax.scheduler import state as state_lib
from ring_jax.scheduler.config import SchedulerConfig
from ring_jax.scheduler.groups import Group
from ring_jax.scheduler.metrics import Metrics
from ring_jax.scheduler.workers import THREAD_PREFIX, WorkerPool

RewardFn = Callable[[dict[str, Any], Request], "tuple[float, dict[str, Any]]"]
AdvantageFn = Callable[[np.ndarray], np.ndarray]

STATE_FORMAT = 1
_POLL_S = 0.05  # how often blocked waits re-check for errors / close


def derive_seed(seed: int, group_id: int, sample_index: int) -> int:
    """Sampling seed of one response: a pure function of (seed, group id, sample index)."""
    state = np.random.SeedSequence([seed, group_id, sample_index]).generate_state(1, np.uint32)
    return int(state[0] >> 1)


class Scheduler:
    """Schedules rollouts and hands the trainer fixed-shape batches of complete, scored groups.

    Args:
      config: the `SchedulerConfig`.
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
    """

    def __init__(self, config: SchedulerConfig, engine: EngineProtocol,
                 prompts: Iterable[dict[str, Any]], reward_fn: RewardFn,
                 advantage_fn: AdvantageFn, *,
                 broadcast_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.config = config
        self._engine = engine
        self._prompts: Iterator[dict[str, Any]] = iter(prompts)
        self._reward_fn = reward_fn
        self._advantage_fn = advantage_fn
        self._broadcast_fn = broadcast_fn
        self._clock = clock
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        # Checkpointed state (see state_dict).
        self._version = int(engine.version)  # newest weights the trainer published
        self._initial_version = self._version
        self._iteration = 0
        self._next_group_id = 0
        self._batches_generated = 0  # async: rollout iterations finished (= batches made)
        self._batches_emitted = 0
        self._source_exhausted = False
        self._requeue: collections.deque[tuple[dict[str, Any], int]] = collections.deque()
        self._groups: dict[int, Group] = {}  # admitted, not yet complete, by group id
        self._buffer: list[tuple[int, int]] = []  # (group id, sample index) of unfinished ones
        self._ready: collections.deque[Group] = collections.deque()
        self._totals: collections.Counter = collections.Counter()
        # Runtime only.
        self._pending_weights: tuple[Any, int] | None = None  # sync / c3po
        self._published: dict[int, Any] = {}  # async: params by version, until loaded
        self._pool = WorkerPool(config.num_reward_workers)
        self._metrics = Metrics()
        self._error: BaseException | None = None
        self._closed = False
        self._stop = False
        self._producer: threading.Thread | None = None
        self._producer_idle = False  # async: waiting for weights newer than published
        self._producer_done = False
        self._last_return: float | None = None
        self.purged_request_ids: list[str] = []  # diagnostic log since construction

    # ---------------------------------------------------------------- public API

    @property
    def version(self) -> int:
        """The newest policy version the trainer published."""
        return self._version

    def update_weights(self, params: Any, version: int) -> None:
        """Publishes the trainer's new weights; the engine installs them at the next iteration
        boundary (never mid-iteration). Call it after every train step, and once after
        `load_state_dict` with the restored params and version."""
        with self._cond:
            if version < self._version:
                raise ValueError(f"update_weights: version {version} is older than the "
                                 f"published version {self._version}")
            self._version = int(version)
            if self.config.mode == "async":
                self._published[self._version] = params
            else:
                self._pending_weights = (params, self._version)
            self._cond.notify_all()

    def next_batch(self) -> dict[str, np.ndarray]:
        """The next training batch (see `batching.build_batch`); StopIteration once the prompts
        are used up and everything is trained or purged (sticky), or after `close()`."""
        start = self._clock()
        try:
            with self._cond:
                groups = self._take_groups()
                batch = batching.build_batch(groups, self.config)
                self._record_batch(groups, start)
            return batch
        except StopIteration:
            raise
        except BaseException as e:
            with self._cond:
                if self._error is None:
                    self._error = e  # later calls fail the same way instead of resuming
            self.close()
            raise

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            try:
                yield self.next_batch()
            except StopIteration:
                return

    def as_dataset(self, prefetch: int = 0):
        """A grain IterDataset of batches (`batching.make_dataset`)."""
        return batching.make_dataset(self, prefetch)

    def pop_metrics(self) -> dict[str, float]:
        """Metrics accumulated since the last call (``sched/`` and ``rollout/`` prefixes)."""
        with self._lock:
            out = self._metrics.pop()
            # Means over the responses trained / scored since the last pop.
            trained = out.get("sched/trained_responses", 0.0)
            if trained:
                out["sched/versions_spanned_mean"] = out["sched/versions_spanned_sum"] / trained
                out["sched/reward_mean"] = out["sched/reward_sum"] / trained
            scored = out.get("sched/responses_finished", 0.0)
            for name in [k for k in out if k.startswith("sched/reward_info/")]:
                if scored:
                    out[name[:-len("_sum")] + "_mean"] = out[name] / scored
            for name, value in self._totals.items():
                out[f"sched/total/{name}"] = float(value)
            out["sched/version"] = float(self._version)
            out["sched/buffer_size"] = float(len(self._buffer))
            out["sched/pending_groups"] = float(len(self._groups))
            out["sched/ready_groups"] = float(len(self._ready))
            return out

    def close(self) -> None:
        """Stops the producer and the reward pool; idempotent, never hangs."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stop = True
            self._cond.notify_all()
        if self._producer is not None and self._producer is not threading.current_thread():
            self._producer.join(2.0)
        self._pool.close()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, np.ndarray]:
        """The exact scheduler state as a flat dict of numpy arrays (`state.encode`).

        Taken at an iteration boundary, so nothing is in the engine or the reward pool; in
        async mode it first waits until the producer is blocked on weights not yet published.
        Batches already returned by `next_batch` are the trainer's; a grain prefetch buffer is
        not included.
        """
        with self._cond:
            if self.config.mode == "async" and self._producer is not None:
                while not (self._producer_idle or self._producer_done or self._error):
                    self._cond.wait(_POLL_S)
            self._raise_error()
            get_state = getattr(self._prompts, "get_state", None)
            tree = {
                "format": STATE_FORMAT,
                "mode": self.config.mode,
                "group_size": self.config.group_size,
                "batch_size": self.config.batch_size,
                "version": self._version,
                "initial_version": self._initial_version,
                "iteration": self._iteration,
                "next_group_id": self._next_group_id,
                "batches_generated": self._batches_generated,
                "batches_emitted": self._batches_emitted,
                "source_exhausted": self._source_exhausted,
                "requeue": [[record, retries] for record, retries in self._requeue],
                "groups": [g.to_tree() for g in self._groups.values()],
                "buffer": [list(x) for x in self._buffer],
                "ready": [g.to_tree() for g in self._ready],
                "totals": dict(self._totals),
                "prompt_iterator": get_state() if get_state is not None else None,
            }
            return state_lib.encode(tree)

    def load_state_dict(self, flat: dict[str, Any]) -> None:
        """Restores `state_dict()` output; call before the first `next_batch`, then
        `update_weights(params, version)` with the restored weights."""
        tree = state_lib.decode(flat)
        with self._cond:
            if self._producer is not None or self._iteration or self._batches_emitted:
                raise RuntimeError("load_state_dict must be called on a fresh Scheduler")
            for key in ("mode", "group_size", "batch_size"):
                if tree[key] != getattr(self.config, key):
                    raise ValueError(f"scheduler state has {key}={tree[key]!r} but the config "
                                     f"has {getattr(self.config, key)!r}")
            if tree["format"] != STATE_FORMAT:
                raise ValueError(f"unknown scheduler state format {tree['format']}")
            self._version = tree["version"]
            self._initial_version = tree["initial_version"]
            self._iteration = tree["iteration"]
            self._next_group_id = tree["next_group_id"]
            self._batches_generated = tree["batches_generated"]
            self._batches_emitted = tree["batches_emitted"]
            self._source_exhausted = tree["source_exhausted"]
            self._requeue = collections.deque((r, n) for r, n in tree["requeue"])
            self._groups = {g["group_id"]: Group.from_tree(g) for g in tree["groups"]}
            self._buffer = [tuple(x) for x in tree["buffer"]]
            self._ready = collections.deque(Group.from_tree(g) for g in tree["ready"])
            self._totals = collections.Counter(tree["totals"])
            if tree["prompt_iterator"] is not None:
                set_state = getattr(self._prompts, "set_state", None)
                if set_state is None:
                    raise ValueError("the scheduler state holds a prompt-iterator position but "
                                     "this prompt iterator has no set_state()")
                set_state(tree["prompt_iterator"])

    # ---------------------------------------------------------------- batches

    def _take_groups(self) -> list[Group]:
        """Pops one batch worth of ready groups, driving rollouts (or waiting) as needed."""
        need = self.config.prompts_per_batch
        while True:
            self._raise_error()
            if self._closed:
                raise StopIteration
            self._purge_stale_ready()
            if len(self._ready) >= need:
                return [self._ready.popleft() for _ in range(need)]
            if self._rollouts_done():
                if self._ready:  # a final, partial batch (its padding rows have no loss)
                    return [self._ready.popleft() for _ in range(len(self._ready))]
                raise StopIteration
            if self.config.mode == "async":
                self._ensure_producer()
                self._cond.wait(_POLL_S)
            else:
                self._rollout_iteration()

    def _rollouts_done(self) -> bool:
        if self.config.mode == "async":
            return self._producer_done
        return self._source_exhausted and not self._requeue and not self._groups

    def _purge_stale_ready(self) -> None:
        limit = self.config.max_version_lag
        for group in list(self._ready):
            oldest = group.oldest_version()
            if oldest is not None and self._version - oldest > limit:
                self._ready.remove(group)
                # async: the producer runs ahead on its own thread, so a prompt re-queued here
                # would be picked up at a timing-dependent iteration; such groups are dropped.
                self._purge_group(group, "stale_at_batch",
                                  requeue=self.config.mode != "async")

    def _record_batch(self, groups: list[Group], start: float) -> None:
        now = self._clock()
        m = self._metrics
        m.add("sched/trainer_wait_s", now - start)
        if self._last_return is not None:
            m.add("sched/end_to_end_s", now - self._last_return)
        self._last_return = now
        self._batches_emitted += 1
        m.add("sched/batches", 1)
        for group in groups:
            for i, (request, cuts) in enumerate(zip(group.members, group.cuts)):
                spanned = int(request.versions.max() - request.versions.min()) + 1
                m.add(f"sched/sigma_hist/{cuts}", 1)
                m.add("sched/versions_spanned_sum", spanned)
                m.max("sched/versions_spanned_max", spanned)
                m.max("sched/version_lag_max", self._version - int(request.versions.min()))
                m.add("sched/trained_responses", 1)
                m.add("sched/trained_tokens", request.num_generated)
                m.add("sched/reward_sum", group.rewards[i])
            m.add("sched/trained_groups", 1)
        self._totals["trained_responses"] += sum(g.size for g in groups)
        self._totals["trained_groups"] += len(groups)

    # ---------------------------------------------------------------- rollouts

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _next_record(self) -> tuple[dict[str, Any], int] | None:
        if self._requeue:
            return self._requeue.popleft()
        if self._source_exhausted:
            return None
        try:
            record = next(self._prompts)
        except StopIteration:
            self._source_exhausted = True
            return None
        return dict(record), 0

    def _new_group(self, record: dict[str, Any], retries: int) -> Group:
        cfg = self.config
        group_id = self._next_group_id
        self._next_group_id += 1
        prompt = np.asarray(record["prompt_tokens"], np.int32)
        room = cfg.max_seq_len - prompt.shape[0]
        if room < 1:
            raise ValueError(f"prompt {record['prompt_id']} has {prompt.shape[0]} tokens: no "
                             f"room for a response within max_seq_len={cfg.max_seq_len}")
        max_new = min(cfg.sampling.max_new_tokens, room)
        sampling = dataclasses.replace(
            cfg.sampling, max_new_tokens=max_new,
            min_new_tokens=min(cfg.sampling.min_new_tokens, max_new))
        members = [
            Request(request_id=f"g{group_id}-s{i}", prompt_tokens=prompt, sampling=sampling,
                    seed=derive_seed(cfg.seed, group_id, i),
                    metadata={"group_id": group_id, "sample_index": i,
                              "prompt_id": int(record["prompt_id"])})
            for i in range(cfg.group_size)]
        self._totals["admitted_groups"] += 1
        return Group(group_id=group_id, record=record, retries=retries, members=members,
                     rewards=[None] * cfg.group_size, cuts=[0] * cfg.group_size)

    def _purge_group(self, group: Group, reason: str, requeue: bool = True) -> None:
        """Drops a group (all G responses count as purged); may re-queue its prompt."""
        cfg = self.config
        self._groups.pop(group.group_id, None)
        self._buffer = [x for x in self._buffer if x[0] != group.group_id]
        self.purged_request_ids.extend(r.request_id for r in group.members)
        self._totals["purged_responses"] += group.size
        self._totals[f"purged_groups/{reason}"] += 1
        self._metrics.add("sched/responses_purged", group.size)
        self._metrics.add("sched/groups_purged", 1)
        if (requeue and cfg.purge_policy == "requeue_prompt"
                and group.retries < cfg.max_prompt_retries):
            self._requeue.append((group.record, group.retries + 1))
            self._totals["requeued_prompts"] += 1

    def _apply_weights(self) -> None:
        if self._pending_weights is not None:
            params, version = self._pending_weights
            self._pending_weights = None
            self._engine.load_weights(params, version)
        if self._engine.version != self._version:
            raise RuntimeError(f"engine holds weights of version {self._engine.version} but the "
                               f"trainer published {self._version}: call update_weights")

    def _prepare(self) -> list[Request]:
        """Steps 2–3 of an iteration: purge stale groups, pick the requests to run."""
        cfg = self.config
        version = self._engine.version
        if cfg.mode == "c3po":
            for group in list(self._groups.values()):
                oldest = group.oldest_version()
                if oldest is not None and version - oldest > cfg.sigma_max:
                    self._purge_group(group, "stale")
        # Oldest first, so a response close to σ_max gets a slot before it is purged.
        def age_key(x: tuple[int, int]) -> tuple[int, int, int]:
            request = self._groups[x[0]].members[x[1]]
            first = int(request.versions[0]) if request.num_generated else np.iinfo(np.int32).max
            return first, x[0], x[1]

        self._buffer.sort(key=age_key)
        requests = [self._groups[g].members[i] for g, i in self._buffer]
        if cfg.mode == "c3po":
            num_new = (cfg.max_active_requests - len(self._buffer)) // cfg.group_size
        else:
            num_new = cfg.prompts_per_batch
        requests.extend(self._admit(num_new))
        self._totals["resumed_responses"] += len(self._buffer)
        self._metrics.add("sched/responses_resumed", len(self._buffer))
        self._buffer = []
        return requests

    def _admit(self, num_groups: int) -> list[Request]:
        """Opens up to ``num_groups`` new groups (re-queued prompts first); their requests."""
        requests = []
        for _ in range(num_groups):
            item = self._next_record()
            if item is None:
                break
            group = self._new_group(*item)
            self._groups[group.group_id] = group
            requests.extend(group.members)
        return requests

    def _generate(self, requests: list[Request]):
        """Step 4–5: runs the engine, sending finished responses to the reward pool."""
        cfg = self.config
        budgeted = cfg.mode == "c3po"
        self._engine.add(requests)
        spent, busy, scoring = 0, 0.0, []
        while True:
            budget = cfg.token_budget - spent if budgeted else None
            if cfg.step_chunk_tokens:
                budget = cfg.step_chunk_tokens if budget is None else min(
                    budget, cfg.step_chunk_tokens)
            t = self._clock()
            out = self._engine.step(budget)
            busy += self._clock() - t
            spent += out.num_new_tokens
            for request in out.finished:
                group = self._groups[request.metadata["group_id"]]
                group.members[request.metadata["sample_index"]] = request
                scoring.append((request, self._pool.submit(self._reward_fn, group.record,
                                                           request)))
            self._metrics.max("sched/reward_queue_depth_max",
                              sum(not f.done() for _, f in scoring))
            in_flight = out.num_in_flight
            if budgeted and spent < cfg.token_budget:
                # C3PO++: new prompts fill the capacity that finished responses free up, so the
                # slots stay busy for the whole budget (only between chunked step calls).
                with self._lock:
                    new = self._admit((cfg.max_active_requests - in_flight) // cfg.group_size)
                if new:
                    self._engine.add(new)
                    in_flight += len(new)
            if in_flight == 0 or (budgeted and spent >= cfg.token_budget):
                break
            if out.num_new_tokens == 0 and out.num_in_flight:
                raise RuntimeError(f"engine.step({budget}) made no progress with "
                                   f"{out.num_in_flight} requests in flight")
        unfinished = self._engine.drain() if in_flight else []
        return spent, busy, scoring, unfinished

    def _rollout_iteration(self) -> bool:
        """One rollout iteration (module docstring); False when there was nothing to run."""
        cfg = self.config
        start = self._clock()
        with self._lock:
            if cfg.mode != "async":
                self._apply_weights()
            requests = self._prepare()
        if not requests:
            return False
        engine_stats = getattr(self._engine, "pop_stats", lambda: {})
        engine_stats()  # drop work done outside rollouts (an evaluation on the same engine)
        spent, busy, scoring, unfinished = self._generate(requests)
        engine_work = engine_stats()
        rewards = np.asarray([float(f.result()[0]) for _, f in scoring], np.float32)
        infos = [f.result()[1] for _, f in scoring]
        if self._broadcast_fn is not None:
            rewards = np.asarray(self._broadcast_fn(rewards), np.float32)
        with self._cond:
            for (request, _), reward, info in zip(scoring, rewards, infos):
                group = self._groups[request.metadata["group_id"]]
                group.rewards[request.metadata["sample_index"]] = float(reward)
                for key, value in (info or {}).items():
                    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                        self._metrics.add(f"sched/reward_info/{key}_sum", float(value))
            for request in unfinished:
                group_id, index = request.metadata["group_id"], request.metadata["sample_index"]
                group = self._groups[group_id]
                group.members[index] = request
                if request.num_generated:
                    group.cuts[index] += 1
                self._buffer.append((group_id, index))
            completed = sorted((g for g in self._groups.values() if g.complete),
                               key=lambda g: g.group_id)
            for group in completed:
                advantages = np.asarray(
                    self._advantage_fn(np.asarray(group.rewards, np.float32)), np.float32)
                if advantages.shape != (group.size,):
                    raise ValueError(f"advantage_fn returned shape {advantages.shape}, "
                                     f"expected ({group.size},)")
                group.advantages = advantages
                del self._groups[group.group_id]
                self._ready.append(group)
            self._iteration += 1
            wall = self._clock() - start
            m = self._metrics
            m.add("sched/iterations", 1)
            m.add("rollout/tokens_generated", spent)
            m.max("rollout/tokens_generated_max_per_iteration", spent)
            m.set("rollout/token_budget", cfg.token_budget if cfg.mode == "c3po" else 0)
            if cfg.mode == "c3po":
                m.set("rollout/budget_used_frac", spent / cfg.token_budget)
            m.add("rollout/engine_busy_s", busy)
            m.add("rollout/engine_idle_s", wall - busy)
            m.add("rollout/phase_s", wall)
            for key, value in engine_work.items():  # `Engine.pop_stats`
                m.add(f"rollout/engine/{key}", value)
            m.add("sched/responses_finished", len(scoring))
            m.add("sched/responses_carried", len(unfinished))
            m.add("sched/groups_completed", len(completed))
            self._totals["generated_tokens"] += spent
            self._totals["finished_responses"] += len(scoring)
            self._totals["carried_responses"] += len(unfinished)
            self._cond.notify_all()
        return True

    # ---------------------------------------------------------------- async producer

    def _ensure_producer(self) -> None:
        if self._producer is None and not self._closed:
            self._producer = threading.Thread(target=self._produce, daemon=True,
                                              name=f"{THREAD_PREFIX}-producer")
            self._producer.start()

    def _produce(self) -> None:
        """Async mode: generate batch n with the weights of version v0 + max(0, n - k)."""
        try:
            while True:
                with self._cond:
                    if self._source_exhausted and not self._requeue:
                        self._producer_done = True
                        self._cond.notify_all()
                        return
                    required = self._initial_version + max(
                        0, self._batches_generated - self.config.max_staleness)
                    while self._version < required and not self._stop:
                        self._producer_idle = True
                        self._cond.notify_all()
                        self._cond.wait(_POLL_S)
                    self._producer_idle = False
                    if self._stop:
                        return
                    load = None
                    if self._engine.version < required:
                        version = min(v for v in self._published if v >= required)
                        load = (self._published[version], version)
                        self._published = {v: p for v, p in self._published.items()
                                           if v > version}
                if load is not None:
                    self._engine.load_weights(*load)
                produced = self._rollout_iteration()
                with self._cond:
                    if not produced and not self._groups:
                        self._producer_done = True
                        self._cond.notify_all()
                        return
                    self._batches_generated += 1
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 — re-raised in the trainer's thread
            with self._cond:
                self._error = e
                self._producer_done = True
                self._cond.notify_all()
