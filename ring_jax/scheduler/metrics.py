"""The scheduler's metrics: a thread-safe accumulator and what is recorded when.

`Metrics` holds sums (counts, seconds), gauges (last value), maxima and samples (reported as
their mean and p90), reset by each `pop` (the async producer adds while the trainer's thread
pops). The ``record_*`` functions name every
metric the scheduler writes (``sched/`` and ``rollout/`` prefixes, summed over the iterations
and batches since the last pop); `summarize` adds the per-response means and the running totals.
"""
from __future__ import annotations

import collections
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from ring_jax.scheduler.groups import Group


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._sums: dict[str, float] = collections.defaultdict(float)
        self._gauges: dict[str, float] = {}
        self._maxima: dict[str, float] = {}
        self._samples: dict[str, list[float]] = collections.defaultdict(list)

    def add(self, name: str, value: float) -> None:
        with self._lock:
            self._sums[name] += float(value)

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = float(value)

    def max(self, name: str, value: float) -> None:
        with self._lock:
            self._maxima[name] = max(self._maxima.get(name, float("-inf")), float(value))

    def sample(self, name: str, value: float) -> None:
        """One observation of a distribution; `pop` reports ``{name}_mean`` and ``{name}_p90``."""
        with self._lock:
            self._samples[name].append(float(value))

    def pop(self) -> dict[str, float]:
        with self._lock:
            out = {**self._sums, **self._gauges, **self._maxima}
            for name, values in self._samples.items():
                out[f"{name}_mean"] = float(np.mean(values))
                out[f"{name}_p90"] = float(np.percentile(values, 90))
            self._sums.clear()
            self._gauges.clear()
            self._maxima.clear()
            self._samples.clear()
            return out


def record_reward_info(m: Metrics, info: Mapping[str, Any] | None) -> None:
    """Numeric fields of a reward's info dict, averaged per scored response by `summarize`."""
    for key, value in (info or {}).items():
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            m.add(f"sched/reward_info/{key}_sum", float(value))


def record_iteration(m: Metrics, *, tokens: int, token_budget: int | None, wall_s: float,
                     busy_s: float, engine_work: Mapping[str, float], num_finished: int,
                     num_carried: int, num_completed_groups: int) -> None:
    """One rollout iteration: generation volume against the budget Φ, engine time, outcomes."""
    m.add("sched/iterations", 1)
    m.add("rollout/tokens_generated", tokens)
    m.max("rollout/tokens_generated_max_per_iteration", tokens)
    m.set("rollout/token_budget", token_budget or 0)
    if token_budget:
        m.set("rollout/budget_used_frac", tokens / token_budget)
    m.add("rollout/engine_busy_s", busy_s)
    m.add("rollout/engine_idle_s", wall_s - busy_s)
    m.add("rollout/phase_s", wall_s)
    for key, value in engine_work.items():  # `Engine.pop_stats`
        m.add(f"rollout/engine/{key}", value)
    m.add("sched/responses_finished", num_finished)
    m.add("sched/responses_carried", num_carried)
    m.add("sched/groups_completed", num_completed_groups)


def record_purge(m: Metrics, group: Group) -> None:
    m.add("sched/responses_purged", group.size)
    m.add("sched/groups_purged", 1)


def record_batch(m: Metrics, groups: Sequence[Group], trainer_version: int) -> None:
    """One batch handed to the trainer: σ histogram (cuts per response), versions spanned,
    lag behind the trainer's weights, volume, response lengths (mean, p90: what a purging
    policy's length bias shows in) and reward."""
    m.add("sched/batches", 1)
    for group in groups:
        for i, (request, cuts) in enumerate(zip(group.members, group.cuts)):
            spanned = int(request.versions.max() - request.versions.min()) + 1
            m.add(f"sched/sigma_hist/{cuts}", 1)
            m.add("sched/versions_spanned_sum", spanned)
            m.max("sched/versions_spanned_max", spanned)
            m.max("sched/version_lag_max", trainer_version - int(request.versions.min()))
            m.add("sched/trained_responses", 1)
            m.add("sched/trained_tokens", request.num_generated)
            m.sample("sched/trained_response_len", request.num_generated)
            m.add("sched/reward_sum", group.rewards[i])
        m.add("sched/trained_groups", 1)


def summarize(out: dict[str, float], totals: Mapping[str, float], *, version: int,
              buffer_size: int, pending_groups: int, ready_groups: int) -> dict[str, float]:
    """A popped metrics dict plus means over the responses trained / scored since the last pop,
    the running ``sched/total/*`` counters and the queue sizes now."""
    trained = out.get("sched/trained_responses", 0.0)
    if trained:
        out["sched/versions_spanned_mean"] = out["sched/versions_spanned_sum"] / trained
        out["sched/reward_mean"] = out["sched/reward_sum"] / trained
    scored = out.get("sched/responses_finished", 0.0)
    for name in [k for k in out if k.startswith("sched/reward_info/")]:
        if scored:
            out[name[:-len("_sum")] + "_mean"] = out[name] / scored
    out.setdefault("sched/responses_purged", 0.0)  # a column in study tables even when 0
    out["sched/total/purged_responses"] = 0.0
    for name, value in totals.items():
        out[f"sched/total/{name}"] = float(value)
    out["sched/version"] = float(version)
    out["sched/buffer_size"] = float(buffer_size)
    out["sched/pending_groups"] = float(pending_groups)
    out["sched/ready_groups"] = float(ready_groups)
    return out
