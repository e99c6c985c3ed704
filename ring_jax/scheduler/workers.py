"""A small pool of daemon threads for reward scoring.

Unlike `concurrent.futures.ThreadPoolExecutor` its threads are daemons and `close()` joins them
with a deadline, so a reward function stuck in a sandbox can never hang shutdown or interpreter
exit. Exceptions travel in the returned `Future` with their original traceback.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from typing import Any, Callable

THREAD_PREFIX = "ring_jax-sched"

_STOP = object()


class WorkerPool:
    def __init__(self, num_workers: int, name: str = "reward"):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{THREAD_PREFIX}-{name}-{i}", daemon=True)
            for i in range(num_workers)]
        self._closed = False
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while True:
            item = self._tasks.get()
            if item is _STOP:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 — handed to whoever waits on the future
                future.set_exception(e)

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError("WorkerPool is closed")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._tasks.put((future, fn, args))
        return future

    def close(self, timeout_s: float = 2.0) -> None:
        """Cancels queued tasks and joins the threads (a task still running past the deadline is
        left to its daemon thread)."""
        if self._closed:
            return
        self._closed = True
        while True:
            try:
                item = self._tasks.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item[0].cancel()
        for _ in self._threads:
            self._tasks.put(_STOP)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
