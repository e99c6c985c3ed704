"""Scheduling policies: what differs between sync, C3PO++ and async, behind one small protocol.

The scheduler's core loop (`scheduler.py`) runs iterations — purge, admit, generate, drain,
score, group — the same way for every policy, and asks its policy four questions:

  how stale may a response be   `max_version_lag()`: most policy versions a trained token may
                                lag the trainer's weights (groups past it never reach training)
  purge or pace                 `groups_to_purge(view)` at each iteration boundary: groups to
                                discard (C3PO++'s σ_max purge); a pacing policy (``paced``)
                                purges nothing and keeps carried work inside the bound through
                                admission
  how many to admit             `num_new_groups(view)` at the iteration boundary, and
                                `num_refill_groups(...)` after every chunked engine step (C3PO++
                                refills the capacity finished responses free up)
  with what token budget        `token_budget(view)`: Φ new tokens, or None (run to completion)

and one structural one: ``background`` — iterations run on a producer thread that generates
batch n with the weights of version v0 + max(0, n - max_version_lag()) (`producer.py`), instead
of on the trainer's thread inside `next_batch`.

Every answer must be a pure function of the view and the config (multi-host rule, see
`scheduler.py`): never of clocks or thread timing.

A new policy is one registered class plus config (``paced`` below is a complete example):

    @register_policy("trickle")
    class Trickle(SchedulingPolicy):
        params = {"groups": 1}           # its own settings, from SchedulerConfig.policy_params
        def max_version_lag(self): return self.config.sigma_max
        def num_new_groups(self, view): return 0 if view.num_buffered else self.params["groups"]

selected with ``scheduler.mode="trickle"`` once its module is imported, or, with no import
anywhere, ``scheduler.mode="my_project.policies:Trickle"``. Its params (defaults, or
`registry.Param`s with ranges, as a correction's) are checked when the config is built, and
`SchedulingPolicy.validate` checks what else the policy needs of the config.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from ring_jax import config as config_lib
from ring_jax.rl import registry

if TYPE_CHECKING:  # the config imports this module to validate ``mode``
    from ring_jax.scheduler.config import SchedulerConfig

_REGISTRY: dict[str, type[SchedulingPolicy]] = {}


@dataclasses.dataclass(frozen=True)
class View:
    """What a policy sees at an iteration boundary; identical on every host.

    version: the weights this iteration generates with.
    num_buffered: unfinished responses carried over from the last iteration (resumed first).
    oldest_versions: group id → oldest token version, for every admitted, incomplete group that
      has generated tokens (purge candidates; a pacing policy's measure of carried work).
    num_groups: admitted, incomplete groups (started or not). In `num_refill_groups` it counts
      the groups admitted so far, boundary and refills (the rest of the view is the boundary's).
    num_ready: complete groups waiting for a batch.
    oldest_ready_version: oldest token version among the ready groups (None: none ready).
    """
    version: int
    num_buffered: int
    oldest_versions: Mapping[int, int]
    num_groups: int = 0
    num_ready: int = 0
    oldest_ready_version: int | None = None


class SchedulingPolicy:
    """Base class and protocol of a scheduling policy (module docstring).

    ``params`` declares the policy's own settings as `registry.Param`s or their shorthand (a
    default, whose type is the parameter's; an int is accepted where the default is a float).
    `SchedulerConfig.policy_params` overrides them and is validated when the config is built.
    """

    name: ClassVar[str] = ""
    params: ClassVar[Mapping[str, Any]] = {}
    background: ClassVar[bool] = False

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.params = dict(registry.resolve_params(type(self).params, config.policy_params,
                                                   "policy_params", f"policy {self.name!r}"))

    @classmethod
    def validate(cls, config: SchedulerConfig) -> None:
        """Checks of the policy's settings beyond their types (ranges, consistency with the
        config), run when the config is built; raise `ConfigError` naming the field."""

    def max_version_lag(self) -> int:
        raise NotImplementedError

    def num_new_groups(self, view: View) -> int:
        """Groups (G requests each) to admit at the iteration boundary."""
        raise NotImplementedError

    def token_budget(self, view: View) -> int | None:
        """New tokens this iteration may spend; None runs every request to completion."""
        return None

    def groups_to_purge(self, view: View) -> list[int]:
        """Ids of incomplete groups to discard before the iteration (`SchedulerConfig.
        purge_policy` decides whether their prompts are queued again)."""
        return []

    def num_refill_groups(self, view: View, num_in_flight: int, tokens_spent: int) -> int:
        """Groups to admit after a chunked engine step, while the iteration runs (``view`` is
        the one taken at this iteration's boundary)."""
        return 0


def register_policy(name: str):
    """Class decorator: registers a `SchedulingPolicy` subclass as ``SchedulerConfig.mode=name``."""

    def wrap(cls: type[SchedulingPolicy]) -> type[SchedulingPolicy]:
        if not (isinstance(cls, type) and issubclass(cls, SchedulingPolicy)):
            raise TypeError(f"register_policy({name!r}): {cls!r} is not a SchedulingPolicy")
        if name in _REGISTRY or ":" in name:
            config_lib.fail("mode", name, "is already registered (or contains ':')")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def names() -> list[str]:
    """Registered policy names."""
    return sorted(_REGISTRY)


def get_policy_class(mode: str) -> type[SchedulingPolicy]:
    """The policy class of ``mode``: a registered name or ``"package.module:ClassName"``;
    an unknown one raises `ConfigError` naming ``mode`` and the registered names."""
    allowed = (f"must be one of {tuple(names())} or 'package.module:ClassName' of a "
               "SchedulingPolicy")
    if not isinstance(mode, str):
        config_lib.fail("mode", mode, allowed)
    if mode in _REGISTRY:
        return _REGISTRY[mode]
    module, sep, attr = mode.partition(":")
    if not sep:
        config_lib.fail("mode", mode, allowed)
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        config_lib.fail("mode", mode, f"{allowed} ({e})")
    if not (isinstance(cls, type) and issubclass(cls, SchedulingPolicy)):
        config_lib.fail("mode", mode, allowed)
    return cls


def check_params(mode: str, policy_cls: type[SchedulingPolicy],
                 policy_params: tuple[tuple[str, Any], ...]) -> None:
    """Validates ``policy_params`` against the declared ``params`` of ``mode``'s policy class
    (`registry.resolve_params`: the rules and messages of corrections' parameters)."""
    registry.resolve_params(policy_cls.params, policy_params, "policy_params", f"policy {mode!r}")


# ------------------------------------------------------------------------------------ built-ins


@register_policy("sync")
class Sync(SchedulingPolicy):
    """The baseline: one batch worth of prompts per iteration, run to completion; on-policy."""

    def max_version_lag(self) -> int:
        return 0

    def num_new_groups(self, view: View) -> int:
        return self.config.prompts_per_batch


@register_policy("c3po")
class C3PO(SchedulingPolicy):
    """C3PO++ (PAPER §2): Φ = ``token_budget`` new tokens per iteration; unfinished responses
    are carried and resumed first; a group whose oldest token lags the current weights by more
    than σ_max = ``sigma_max`` versions is purged; new prompts fill the capacity
    ``max_active_requests`` left by the buffer, at the boundary and after every chunked step."""

    def max_version_lag(self) -> int:
        return self.config.sigma_max

    def token_budget(self, view: View) -> int:
        return self.config.token_budget

    def groups_to_purge(self, view: View) -> list[int]:
        return [group_id for group_id, oldest in view.oldest_versions.items()
                if view.version - oldest > self.config.sigma_max]

    def num_new_groups(self, view: View) -> int:
        return (self.config.max_active_requests - view.num_buffered) // self.config.group_size

    def num_refill_groups(self, view: View, num_in_flight: int, tokens_spent: int) -> int:
        if tokens_spent >= self.config.token_budget:
            return 0
        return (self.config.max_active_requests - num_in_flight) // self.config.group_size


@register_policy("async")
class Async(SchedulingPolicy):
    """k-step off-policy overlap: a producer thread runs ``sync``-style iterations, batch n with
    the weights of version v0 + max(0, n - k), k = ``max_staleness``."""

    background = True

    def max_version_lag(self) -> int:
        return self.config.max_staleness

    def num_new_groups(self, view: View) -> int:
        return self.config.prompts_per_batch


@register_policy("paced")
class Paced(C3PO):
    """C3PO++ with staleness kept by pacing admission instead of purging (issue 14, item 3).

    As ``c3po``: Φ = ``token_budget`` new tokens per iteration, unfinished responses carried
    and resumed first, freed capacity refilled after every chunked step. Unlike it, nothing is
    ever purged, so the σ_max purge's bias toward short responses (the long ones are the ones
    cut most often) does not exist: the trained responses of a prompt set are the ones ``sync``
    would train.

    The bound. Call the *pipeline* the N admitted groups not yet trained (incomplete + ready),
    and λ the lag v - o of its oldest token (o) behind the current weights v (0 if none has a
    token yet). Every batch trains P = ``batch_size / group_size`` groups and, in the RL loop,
    the trainer then publishes u = ``versions_per_batch`` new versions (one train step per
    batch: u = 1); iterations run only while fewer than P groups are ready. So the quantity
    v + u·(⌈N/P⌉ - 1) — the version the last pipeline group would be trained at if nothing more
    were admitted — never grows with a batch (v += u, N -= P) nor with an iteration that
    admits nothing (N is unchanged: groups only move from incomplete to ready). The policy
    admits a group only while that keeps

        v + u·(⌈N/P⌉ - 1) - o ≤ σ_max,   i.e.   N ≤ P·(1 + ⌊(σ_max - λ)/u⌋),

    so while a group is in the pipeline (N ≥ 1) the trainer's version is at most its oldest
    token's + σ_max: every admitted response is trained within σ_max versions, however long it
    is. Pacing, not purging: the cap shrinks from P·(1 + ⌊σ_max/u⌋) groups with fresh work to
    one batch's P while the oldest carried work is at the bound. A response longer than σ_max
    iterations' budget simply makes more iterations run at the same version (the trainer
    waits, as under ``sync``); none is cut short or dropped. One batch's worth is always
    admissible (cap ≥ P), so the schedule never stalls.

    The guarantee needs the trainer to publish at most u versions per batch; one that
    publishes more (several optimizer updates per batch, with u left at 1) can age a group
    past σ_max, and the scheduler's batch-time staleness check then purges it as for every
    policy (counted in ``sched/total/purged_groups/stale_at_batch``, never silent). It also
    needs iterations on the trainer's thread (a foreground policy: ``background`` False), so
    that no batch is taken while an iteration admits.
    """

    params = {"versions_per_batch": registry.Param(int, 1, min_value=1)}

    def groups_to_purge(self, view: View) -> list[int]:
        return []  # pacing keeps every group within σ_max (class docstring)

    def max_pipeline_groups(self, view: View) -> int:
        """Most groups admitted and not yet trained that keep every one within σ_max."""
        oldest = list(view.oldest_versions.values())
        if view.oldest_ready_version is not None:
            oldest.append(view.oldest_ready_version)
        lag = view.version - min(oldest) if oldest else 0
        per_batch = self.config.prompts_per_batch
        return per_batch * max(1, 1 + (self.config.sigma_max - lag)
                               // self.params["versions_per_batch"])

    def _admissible(self, view: View, free_requests: int) -> int:
        room = self.max_pipeline_groups(view) - view.num_groups - view.num_ready
        return max(0, min(free_requests // self.config.group_size, room))

    def num_new_groups(self, view: View) -> int:
        return self._admissible(view, self.config.max_active_requests - view.num_buffered)

    def num_refill_groups(self, view: View, num_in_flight: int, tokens_spent: int) -> int:
        return min(super().num_refill_groups(view, num_in_flight, tokens_spent),
                   self._admissible(view, self.config.max_active_requests - num_in_flight))
