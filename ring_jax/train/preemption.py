"""SIGTERM as a request to stop at the next step boundary with a checkpoint (preemption).

SLURM and TPU preemption, `timeout` and `docker stop` send SIGTERM and wait a grace period
before SIGKILL. Python's default handling dies at once, abandoning the in-flight async save and
up to `save_every` steps. Instead:

    with StopOnSignal() as stop:
        for step in ...:
            ...                                   # the step in progress finishes
            if stop.should_stop():
                ckpt.save(step, ...)              # a checkpoint of the step just finished
                stop.exit(step, ckpt)             # waits for pending saves, raises Preempted

`Preempted` is a `SystemExit` with code `EXIT_CODE` = 75 (EX_TEMPFAIL, "temporary failure, try
again"): a launcher or requeue script can tell a clean preemption (rerun the same command to
resume; no step lost) from a crash (1) or a kill (137/143). A second SIGTERM while stopping
gets the previous handler (by default: die at once; the last committed checkpoint stays valid).

Multi-process runs: the signal reaches each process at its own moment, so `should_stop` agrees
across processes (one tiny all-gather per call) and all stop after the same step. Handlers can
only be installed from the main thread; elsewhere `StopOnSignal` never requests a stop.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Any

EXIT_CODE = 75


class Preempted(SystemExit):
    """Raised after the checkpoint of `step` is committed; exits the process with EXIT_CODE."""

    def __init__(self, step: int):
        super().__init__(EXIT_CODE)
        self.step = step


class StopOnSignal:
    """Context manager: while active, SIGTERM sets a flag instead of killing the process."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        # The next signal gets the old behaviour: a second TERM while saving kills at once.
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return self.received is not None

    def should_stop(self) -> bool:
        """Whether any process received a stop signal (the same answer on every process)."""
        import jax
        if jax.process_count() == 1:
            return self.requested
        import numpy as np
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.max(flags))

    def exit(self, step: int, checkpointer: Any) -> None:
        """Waits for `checkpointer`'s pending saves, says so, raises `Preempted(step)`."""
        checkpointer.wait()
        name = signal.Signals(self.received).name if self.received else "a stop signal"
        print(f"{name} received: stopped after step {step}, its checkpoint is saved under "
              f"{checkpointer.directory}; rerun the same command to resume "
              f"(exit code {EXIT_CODE})", file=sys.stderr, flush=True)
        raise Preempted(step)
