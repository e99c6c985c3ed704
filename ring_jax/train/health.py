"""Stop a run whose loss or parameters stay non-finite, before it saves the damage.

The optimizer already skips a single update with a non-finite gradient (`optim.py`). The jitted
train steps report ``train/params_finite`` (`integrity.all_finite` of the updated parameters,
computed inside the step, so checking costs no extra pass over the weights). When the
loss or the parameters stay NaN/inf for `max_consecutive` steps in a row (the run has
diverged or its state is poisoned), the loop raises `NonFiniteError` *before* saving that
step, so no NaN checkpoint rotates out the good ones (retention additionally keeps the newest
finite checkpoint, see `checkpoint.py`). Shorter streaks are logged, one warning per step.
"""
from __future__ import annotations

import logging
import math
log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The loss or parameters were non-finite for too many consecutive steps."""


class NonFiniteGuard:
    """Counts consecutive steps with a non-finite loss or parameters.

    stage: "rl" or "sft" (named in messages). max_consecutive: the streak that stops the run
    (`checkpoint.max_nonfinite_steps`).
    """

    def __init__(self, max_consecutive: int, stage: str):
        self.max_consecutive = max_consecutive
        self.stage = stage
        self.streak = 0

    def check(self, step: int, loss: float, params_finite: float) -> None:
        """Call after each step, before saving it, with the step's loss and its
        ``train/params_finite`` metric; raises `NonFiniteError` at the limit."""
        finite = math.isfinite(float(loss)) and bool(params_finite)
        self.streak = 0 if finite else self.streak + 1
        if not self.streak:
            return
        what = f"{self.stage} step {step}: non-finite " + (
            "parameters" if math.isfinite(float(loss)) else f"loss ({float(loss)})")
        if self.streak >= self.max_consecutive:
            raise NonFiniteError(
                f"{what}, {self.streak} consecutive steps (checkpoint.max_nonfinite_steps="
                f"{self.max_consecutive}); stopped before saving step {step}. The newest "
                f"finite checkpoint is kept; lower the learning rate or inspect the data "
                f"before resuming")
        log.warning("%s (%d of %d allowed in a row)", what, self.streak,
                    self.max_consecutive - 1)
