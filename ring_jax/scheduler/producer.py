"""The producer thread of background policies (async): rollouts ahead of the trainer.

Batch n (0-based, counted from construction) is generated with the weights of version
v0 + max(0, n - k), k = the policy's `max_version_lag()`: before each iteration the thread
counts the full batches its complete groups already make (n), waits until the trainer has
published that version (`Scheduler.update_weights` → `publish`), installs it at the iteration
boundary and runs one iteration. For async one iteration makes one batch; a policy whose
batches take several iterations (a token budget) is paced the same way, by batches. Decisions are gated on version counts,
never on clocks, so the schedule is the same whichever side is slower; the ready queue stays
bounded (≤ k + 1 batches ahead). After each iteration it assembles up to
``SchedulerConfig.prefetch_batches`` complete batches ahead of the trainer
(`Scheduler.assemble_ahead`), so batch packing overlaps training too.

`wait_idle` lets `Scheduler.state_dict` take its cut while the thread is blocked on weights not
yet published: at that point nothing is in the engine or the reward pool and the cut is a pure
function of the published version. An exception on the thread is stored in the scheduler and
re-raised in the trainer's thread by the next `next_batch`.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from ring_jax.scheduler.workers import THREAD_PREFIX

if TYPE_CHECKING:
    from ring_jax.scheduler.scheduler import Scheduler

POLL_S = 0.05  # how often blocked waits re-check for errors / close


class Producer:
    """Runs `Scheduler.rollout_iteration` on its own thread (module docstring). Every method
    except `join` is called with the scheduler's condition held."""

    def __init__(self, scheduler: Scheduler):
        self._sched = scheduler
        self._cond = scheduler.cond
        self._published: dict[int, Any] = {}  # params by version, until installed
        self._thread: threading.Thread | None = None
        self.idle = False  # waiting for weights newer than the published ones
        self.done = False  # the prompt source is used up, or the thread failed / stopped

    @property
    def started(self) -> bool:
        return self._thread is not None

    def publish(self, params: Any, version: int) -> None:
        self._published[version] = params

    def ensure_started(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"{THREAD_PREFIX}-producer")
            self._thread.start()

    def wait_idle(self) -> None:
        """Blocks until the thread waits for weights not yet published, has finished, or failed.

        `idle` alone is not enough: it stays set from the moment the trainer publishes the
        awaited version until the thread wakes, and a cut taken in that window would leave an
        older published version uninstalled, which a restored process (it re-publishes only the
        current one) could not install."""
        while self.started and not (self._blocked_on_unpublished() or self.done
                                    or self._sched.failed):
            self._cond.wait(POLL_S)

    def _blocked_on_unpublished(self) -> bool:
        return self.idle and self._sched.state.version < self._required_version()

    def join(self, timeout_s: float = 2.0) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _required_version(self) -> int:
        state = self._sched.state
        lag = self._sched.policy.max_version_lag()
        batches_made = state.groups_completed // self._sched.config.prompts_per_batch
        return state.initial_version + max(0, batches_made - lag)

    def _next_weights(self) -> tuple[Any, int] | None:
        """Waits for the weights batch n needs; those to install (None: the engine has them),
        or raises StopIteration when the scheduler closes."""
        required = self._required_version()
        while self._sched.state.version < required and not self._sched.closed:
            self.idle = True
            self._cond.notify_all()
            self._cond.wait(POLL_S)
        self.idle = False
        if self._sched.closed:
            raise StopIteration
        if self._sched.engine.version >= required:
            return None
        version = min(v for v in self._published if v >= required)
        load = (self._published[version], version)
        self._published = {v: p for v, p in self._published.items() if v > version}
        return load

    def _run(self) -> None:
        sched = self._sched
        try:
            while True:
                with self._cond:
                    state = sched.state
                    if state.source_exhausted and not state.requeue and not state.groups:
                        return  # nothing left to admit or to finish
                    load = self._next_weights()
                if load is not None:
                    sched.engine.load_weights(*load)
                produced = sched.rollout_iteration()
                with self._cond:
                    if not produced and not sched.state.groups:
                        return
                    sched.assemble_ahead()
                    self._cond.notify_all()
        except StopIteration:
            pass
        except BaseException as e:  # noqa: BLE001 — re-raised in the trainer's thread
            with self._cond:
                sched.fail(e)
        finally:
            with self._cond:
                self.done = True
                self._cond.notify_all()
