"""The console progress line: step, a bar, the key numbers of the run and the ETA.

    step   120/1000 [###-------------------]  12% | reward 0.531 | eval 0.610 | mismatch 0.021
    | tok/s 1.2k | 3.1 s/step | ETA 45m12s

Values come from the metrics dict of each step. A key missing from a step (evaluation runs
only every few steps) keeps showing its last value. The ETA uses the wall time of the steps
run in this process (a resumed run does not count the time before the restart).
"""
from __future__ import annotations

import math
import sys
import time
from typing import Mapping, TextIO

# label shown -> metric name. The RL loop's names; a loop with other names passes its own.
DEFAULT_FIELDS: dict[str, str] = {
    "reward": "rl/reward_mean",
    "eval": "eval/pass@1",
    "mismatch": "mismatch/abs_logp_diff_mean",
    "tok/s": "perf/tokens_per_s",
}


def format_duration(seconds: float) -> str:
    """4000 -> '1h06m40s'; 75 -> '1m15s'; 3.2 -> '3s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_value(value: float) -> str:
    """Short numbers for one line: 0.531, 12.4, 1.2k, 3.4M, nan."""
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1e6:
        return f"{value / 1e6:.1f}M"
    if magnitude >= 1e4:
        return f"{value / 1e3:.1f}k"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 1 or magnitude == 0:
        return f"{value:.3g}" if magnitude < 10 else f"{value:.1f}"
    return f"{value:.3f}" if magnitude >= 1e-3 else f"{value:.1e}"


class ProgressLine:
    """Prints one progress line every `every` steps (and at the last step).

    total_steps: the step the run ends at (None: no bar, no ETA).
    start_step: the step this process starts from (the restored step on resume).
    """

    def __init__(self, total_steps: int | None, *, start_step: int = 0, every: int = 1,
                 fields: Mapping[str, str] = DEFAULT_FIELDS, bar_width: int = 20,
                 stream: TextIO | None = None, clock=time.monotonic):
        self.total_steps = total_steps
        self.every = max(1, every)
        self.fields = dict(fields)
        self.bar_width = bar_width
        self.stream = stream
        self._clock = clock
        self._start_step = start_step
        self._start_time = clock()
        self._last: dict[str, float] = {}

    def line(self, step: int, metrics: Mapping[str, float]) -> str:
        """The text for `step` (also records the values for later lines)."""
        for label, name in self.fields.items():
            if name in metrics:
                self._last[label] = float(metrics[name])
        parts = []
        if self.total_steps:
            frac = min(max(step / self.total_steps, 0.0), 1.0)
            filled = int(frac * self.bar_width)
            width = len(str(self.total_steps))
            parts.append(f"step {step:>{width}}/{self.total_steps} "
                         f"[{'#' * filled}{'-' * (self.bar_width - filled)}] {frac:4.0%}")
        else:
            parts.append(f"step {step}")
        parts += [f"{label} {format_value(self._last[label])}" for label in self.fields
                  if label in self._last]
        done = step - self._start_step
        if done > 0:
            per_step = (self._clock() - self._start_time) / done
            parts.append(f"{per_step:.2f} s/step" if per_step < 10 else
                         f"{per_step:.0f} s/step")
            if self.total_steps:
                parts.append(f"ETA {format_duration(per_step * max(self.total_steps - step, 0))}")
        return " | ".join(parts)

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records `metrics` and prints the line when `step` is due."""
        text = self.line(step, metrics)
        if step % self.every == 0 or step == self.total_steps:
            print(text, file=self.stream or sys.stdout, flush=True)
