"""Task scoring in worker processes with a hard timeout.

Verifiers such as math-verify cannot be interrupted inside a thread (sympy can hold the GIL for
minutes on an adversarial answer); `RewardConfig(score_timeout_s=...)` routes ``task.score``
through an `IsolatedScorer` instead: each call runs in one of ``num_workers`` spawned processes
and a worker that misses the deadline is killed and replaced, the call scoring 0 with
``details["error"]``. Cost: a pickle round trip per call (~0.1 ms) and a process start (~2 s,
spawn + imports) per worker at first use or after a timeout.
"""
from __future__ import annotations

import multiprocessing
import queue
import threading
from typing import Any

from ring_jax.data.tasks.base import PromptRecord, RewardResult, Task


def _worker_main(conn) -> None:
    tasks: list[Task] = []
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "task":
            tasks.append(message[1])
        else:
            _, task_index, record, text = message
            conn.send(tasks[task_index].score(record, text))


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.tasks: list[Task] = []  # tasks sent to this worker, by index

    def task_index(self, task: Task) -> int:
        for i, sent in enumerate(self.tasks):
            if sent is task or sent == task:
                return i
        self.conn.send(("task", task))
        self.tasks.append(task)
        return len(self.tasks) - 1

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


def _failure(message: str) -> RewardResult:
    return RewardResult(0.0, {"format_ok": False, "answer_parsed": False, "correct": False,
                              "error": message})


class IsolatedScorer:
    """Thread-safe: up to ``num_workers`` calls score concurrently, more wait for a worker."""

    def __init__(self, num_workers: int, timeout_s: float):
        self._ctx = multiprocessing.get_context("spawn")  # never fork a process running JAX
        self._timeout_s = timeout_s
        self._num_workers = num_workers
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(num_workers):
            self._idle.put(None)  # started on first use
        self._lock = threading.Lock()
        self._closed = False

    def score(self, task: Task, record: PromptRecord | Any, text: str) -> RewardResult:
        worker = self._idle.get()
        try:
            if self._closed:
                return _failure("scorer closed")
            if worker is None:
                worker = _Worker(self._ctx)
            worker.conn.send(("score", worker.task_index(task),
                              PromptRecord.from_mapping(record), text))
            if worker.conn.poll(self._timeout_s):
                return worker.conn.recv()
            worker.kill()
            worker = None
            return _failure(f"scoring timed out after {self._timeout_s} s")
        except (EOFError, OSError) as e:  # the worker died (e.g. out of memory)
            if worker is not None:
                worker.kill()
            worker = None
            return _failure(f"scoring worker died: {e!r}")
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        """Stops the workers; waits for calls in flight to hand theirs back."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        workers = [self._idle.get() for _ in range(self._num_workers)]
        for worker in workers:
            if worker is not None:
                worker.kill()
            self._idle.put(None)
