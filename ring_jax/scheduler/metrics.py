"""Thread-safe metric accumulator: sums (counts, seconds), gauges (last value) and maxima,
reset by each `pop` (the async producer adds while the trainer's thread pops)."""
from __future__ import annotations

import collections
import threading


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._sums: dict[str, float] = collections.defaultdict(float)
        self._gauges: dict[str, float] = {}
        self._maxima: dict[str, float] = {}

    def add(self, name: str, value: float) -> None:
        with self._lock:
            self._sums[name] += float(value)

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = float(value)

    def max(self, name: str, value: float) -> None:
        with self._lock:
            self._maxima[name] = max(self._maxima.get(name, float("-inf")), float(value))

    def pop(self) -> dict[str, float]:
        with self._lock:
            out = {**self._sums, **self._gauges, **self._maxima}
            self._sums.clear()
            self._gauges.clear()
            self._maxima.clear()
            return out
