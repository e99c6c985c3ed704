"""One rollout iteration (steps 1–6 of `scheduler.py`'s docstring), asked of the policy.

`Rollouts` owns what an iteration touches — the engine, the prompt source, the reward worker
pool, the reward and advantage functions — and works on the shared `SchedulerState` under the
scheduler's condition. It runs on the trainer's thread (foreground policies) or on the producer
thread (background policies); the engine and the reward pool are used outside the lock, so the
trainer's thread can take ready batches while an iteration generates.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Iterator

import numpy as np

from ring_jax.rollout.types import EngineProtocol, Request
from ring_jax.scheduler import metrics as metrics_lib
from ring_jax.scheduler import state as state_lib
from ring_jax.scheduler.config import SchedulerConfig
from ring_jax.scheduler.groups import Group
from ring_jax.scheduler.policies import SchedulingPolicy, View
from ring_jax.scheduler.workers import WorkerPool

RewardFn = Callable[[dict[str, Any], Request], "tuple[float, dict[str, Any]]"]
AdvantageFn = Callable[[np.ndarray], np.ndarray]


def derive_seed(seed: int, group_id: int, sample_index: int) -> int:
    """Sampling seed of one response: a pure function of (seed, group id, sample index)."""
    state = np.random.SeedSequence([seed, group_id, sample_index]).generate_state(1, np.uint32)
    return int(state[0] >> 1)


class Rollouts:
    """Runs rollout iterations for a `Scheduler` (module docstring); arguments as there."""

    def __init__(self, config: SchedulerConfig, policy: SchedulingPolicy,
                 engine: EngineProtocol, prompts: Iterator[dict[str, Any]],
                 reward_fn: RewardFn, advantage_fn: AdvantageFn, *,
                 broadcast_fn: Callable[[np.ndarray], np.ndarray] | None,
                 clock: Callable[[], float], cond: threading.Condition,
                 metrics: metrics_lib.Metrics):
        self.config = config
        self.policy = policy
        self.engine = engine
        self.prompts = prompts
        self._reward_fn = reward_fn
        self._advantage_fn = advantage_fn
        self._broadcast_fn = broadcast_fn
        self._clock = clock
        self._cond = cond
        self._metrics = metrics
        self._pool = WorkerPool(config.num_reward_workers)
        self.state = state_lib.SchedulerState(version=int(engine.version),
                                              initial_version=int(engine.version))
        self.pending_weights: tuple[Any, int] | None = None  # foreground: installed at step 1
        self.purged_request_ids: list[str] = []  # diagnostic log since construction

    def close(self) -> None:
        self._pool.close()

    @property
    def done(self) -> bool:
        """No prompt left to admit and no admitted group left to finish."""
        s = self.state
        return s.source_exhausted and not s.requeue and not s.groups

    def purge_group(self, group: Group, reason: str, requeue: bool = True) -> None:
        """Drops a group (all G responses count as purged); may re-queue its prompt."""
        cfg, s = self.config, self.state
        s.groups.pop(group.group_id, None)
        s.buffer = [x for x in s.buffer if x[0] != group.group_id]
        self.purged_request_ids.extend(r.request_id for r in group.members)
        s.totals["purged_responses"] += group.size
        s.totals[f"purged_groups/{reason}"] += 1
        metrics_lib.record_purge(self._metrics, group)
        if (requeue and cfg.purge_policy == "requeue_prompt"
                and group.retries < cfg.max_prompt_retries):
            s.requeue.append((group.record, group.retries + 1))
            s.totals["requeued_prompts"] += 1

    def run_iteration(self, install_weights: bool) -> bool:
        """One rollout iteration; False when there was nothing to run. ``install_weights``:
        install the pending published weights first (foreground policies)."""
        start = self._clock()
        with self._cond:
            if install_weights:
                self._install_weights()
            requests, view = self._prepare()
            budget = self.policy.token_budget(view)
        if not requests:
            return False
        engine_stats = getattr(self.engine, "pop_stats", lambda: {})
        engine_stats()  # drop work done outside rollouts (an evaluation on the same engine)
        spent, busy, scoring, unfinished = self._generate(requests, view, budget)
        engine_work = engine_stats()
        rewards = np.asarray([float(f.result()[0]) for _, f in scoring], np.float32)
        infos = [f.result()[1] for _, f in scoring]
        if self._broadcast_fn is not None:
            rewards = np.asarray(self._broadcast_fn(rewards), np.float32)
        with self._cond:
            s = self.state
            for (request, _), reward, info in zip(scoring, rewards, infos):
                group = s.groups[request.metadata["group_id"]]
                group.rewards[request.metadata["sample_index"]] = float(reward)
                metrics_lib.record_reward_info(self._metrics, info)
            for request in unfinished:
                group_id, index = request.metadata["group_id"], request.metadata["sample_index"]
                group = s.groups[group_id]
                group.members[index] = request
                if request.num_generated:
                    group.cuts[index] += 1
                s.buffer.append((group_id, index))
            completed = self._complete_groups()
            s.iteration += 1
            metrics_lib.record_iteration(
                self._metrics, tokens=spent, token_budget=budget, wall_s=self._clock() - start,
                busy_s=busy, engine_work=engine_work, num_finished=len(scoring),
                num_carried=len(unfinished), num_completed_groups=len(completed))
            s.totals["generated_tokens"] += spent
            s.totals["finished_responses"] += len(scoring)
            s.totals["carried_responses"] += len(unfinished)
            self._cond.notify_all()
        return True

    # ---------------------------------------------------------------- steps

    def _install_weights(self) -> None:
        if self.pending_weights is not None:
            params, version = self.pending_weights
            self.pending_weights = None
            self.engine.load_weights(params, version)
        if self.engine.version != self.state.version:
            raise RuntimeError(f"engine holds weights of version {self.engine.version} but the "
                               f"trainer published {self.state.version}: call update_weights")

    def _view(self) -> View:
        s = self.state
        oldest = {gid: g.oldest_version() for gid, g in s.groups.items()}
        ready = [v for v in (g.oldest_version() for g in s.ready) if v is not None]
        return View(version=int(self.engine.version), num_buffered=len(s.buffer),
                    oldest_versions={gid: v for gid, v in oldest.items() if v is not None},
                    num_groups=len(s.groups), num_ready=len(s.ready),
                    oldest_ready_version=min(ready) if ready else None)

    def _prepare(self) -> tuple[list[Request], View]:
        """Steps 2–3: purge, then the requests to run; and the view the policy saw."""
        s = self.state
        for group_id in self.policy.groups_to_purge(self._view()):
            self.purge_group(s.groups[group_id], "stale")
        view = self._view()

        # Oldest first, so a response close to the staleness bound gets a slot before it is
        # purged.
        def age_key(x: tuple[int, int]) -> tuple[int, int, int]:
            request = s.groups[x[0]].members[x[1]]
            first = int(request.versions[0]) if request.num_generated else np.iinfo(np.int32).max
            return first, x[0], x[1]

        s.buffer.sort(key=age_key)
        requests = [s.groups[g].members[i] for g, i in s.buffer]
        requests.extend(self._admit(self.policy.num_new_groups(view)))
        s.totals["resumed_responses"] += len(s.buffer)
        self._metrics.add("sched/responses_resumed", len(s.buffer))
        s.buffer = []
        return requests, view

    def _admit(self, num_groups: int) -> list[Request]:
        """Opens up to ``num_groups`` new groups (re-queued prompts first); their requests."""
        requests = []
        for _ in range(num_groups):
            item = self._next_record()
            if item is None:
                break
            group = self._new_group(*item)
            self.state.groups[group.group_id] = group
            requests.extend(group.members)
        return requests

    def _next_record(self) -> tuple[dict[str, Any], int] | None:
        s = self.state
        if s.requeue:
            return s.requeue.popleft()
        if s.source_exhausted:
            return None
        try:
            record = next(self.prompts)
        except StopIteration:
            s.source_exhausted = True
            return None
        return dict(record), 0

    def _new_group(self, record: dict[str, Any], retries: int) -> Group:
        cfg = self.config
        group_id = self.state.next_group_id
        self.state.next_group_id += 1
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
        self.state.totals["admitted_groups"] += 1
        return Group(group_id=group_id, record=record, retries=retries, members=members,
                     rewards=[None] * cfg.group_size, cuts=[0] * cfg.group_size)

    def _generate(self, requests: list[Request], view: View, budget: int | None):
        """Steps 4–5: runs the engine, sending finished responses to the reward pool."""
        chunk = self.config.step_chunk_tokens
        self.engine.add(requests)
        spent, busy, scoring = 0, 0.0, []
        while True:
            step_budget = budget - spent if budget is not None else None
            if chunk:
                step_budget = chunk if step_budget is None else min(step_budget, chunk)
            t = self._clock()
            out = self.engine.step(step_budget)
            busy += self._clock() - t
            spent += out.num_new_tokens
            for request in out.finished:
                group = self.state.groups[request.metadata["group_id"]]
                group.members[request.metadata["sample_index"]] = request
                scoring.append((request, self._pool.submit(self._reward_fn, group.record,
                                                           request)))
            self._metrics.max("sched/reward_queue_depth_max",
                              sum(not f.done() for _, f in scoring))
            in_flight = out.num_in_flight
            # New prompts may fill the capacity that finished responses free up, so the slots
            # stay busy for the whole budget (only between chunked step calls).
            with self._cond:
                now = dataclasses.replace(view, num_groups=len(self.state.groups))
                new = self._admit(self.policy.num_refill_groups(now, in_flight, spent))
            if new:
                self.engine.add(new)
                in_flight += len(new)
            if in_flight == 0 or (budget is not None and spent >= budget):
                break
            if out.num_new_tokens == 0 and out.num_in_flight:
                raise RuntimeError(f"engine.step({step_budget}) made no progress with "
                                   f"{out.num_in_flight} requests in flight")
        unfinished = self.engine.drain() if in_flight else []
        return spent, busy, scoring, unfinished

    def _complete_groups(self) -> list[Group]:
        """Step 6: groups whose G members are finished and scored get their advantages and
        move to the ready queue, in group-id order."""
        s = self.state
        completed = sorted((g for g in s.groups.values() if g.complete),
                           key=lambda g: g.group_id)
        for group in completed:
            advantages = np.asarray(
                self._advantage_fn(np.asarray(group.rewards, np.float32)), np.float32)
            if advantages.shape != (group.size,):
                raise ValueError(f"advantage_fn returned shape {advantages.shape}, "
                                 f"expected ({group.size},)")
            group.advantages = advantages
            del s.groups[group.group_id]
            s.ready.append(group)
        s.groups_completed += len(completed)
        return completed
