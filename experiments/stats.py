"""Statistics for study tables: spread over seeds, paired differences, pre-declared readouts.

A study runs every arm with the same seeds, and every run with seed s shares its SFT warm start,
its evaluation problems (`ring_jax.train.evaluate.eval_records`: the same fixed set for every
seed and arm) and its seed streams with the other arms' run s, so arms are compared pairwise:

  * spread: the sample standard deviation over seeds (``ddof=1``, `sample_std`);
  * paired difference of an arm against the study's baseline arm: per seed d_s = arm_s − base_s,
    their mean with a percentile-bootstrap 95% CI (`bootstrap_ci`: 10,000 resamples of the seeds
    with a fixed generator seed, so a table is reproducible) and an exact two-sided sign test
    (`sign_test`). A CI that contains 0 prints "n.s." (`format_paired`).

With few seeds the bootstrap CI is coarse (3 seeds have 10 distinct resample means) and the
sign test cannot reach p < 0.05 below 6 seeds; the table says how many seeds each cell rests on.

Readouts are declared in a study's config before its runs (``READOUTS = {name: fn}``, `fn`
taking one run's metrics records and returning a number or None); `collapse_readout`,
`spike_readout` and `slope_readout` build the ones the stability study uses.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1); nan for fewer than two values."""
    values = np.asarray(values, np.float64)
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def mean_std_cell(values: Sequence[float], digits: int = 3) -> str:
    """"m ± s" (s: sample std over seeds), the value alone for one seed, "–" for none."""
    if len(values) == 0:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {sample_std(values):.{digits}f}"


def last_evaluations_mean(values: Sequence[float], num_last: int) -> float:
    """Mean of the last ``num_last`` evaluations of a run (all of them if fewer); less noisy
    than the final one alone."""
    values = np.asarray(values, np.float64)
    if len(values) == 0:
        return math.nan
    return float(values[-num_last:].mean())


def bootstrap_ci(diffs: Sequence[float], confidence: float = CONFIDENCE,
                 num_resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of ``diffs``: resample the seeds with replacement
    ``num_resamples`` times (a fixed generator seed: the same table every time), take the
    (1 ± confidence)/2 quantiles of the resampled means."""
    diffs = np.asarray(diffs, np.float64)
    if len(diffs) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(diffs), size=(num_resamples, len(diffs)))
    means = diffs[picks].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def sign_test(diffs: Sequence[float]) -> float:
    """Exact two-sided sign test p-value of "positive and negative differences are equally
    likely"; zero differences are dropped (1.0 when none is left)."""
    diffs = np.asarray(diffs, np.float64)
    num_pos, num_neg = int((diffs > 0).sum()), int((diffs < 0).sum())
    n = num_pos + num_neg
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(num_pos, num_neg) + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


@dataclasses.dataclass(frozen=True)
class Paired:
    """An arm against the baseline over the seeds both have."""

    seeds: tuple[int, ...]
    mean_diff: float
    ci_low: float
    ci_high: float
    num_positive: int
    num_negative: int
    sign_p: float

    @property
    def significant(self) -> bool:
        """The CI excludes 0 (a CI touching 0 counts as spanning it)."""
        return bool(self.ci_low > 0 or self.ci_high < 0)


def paired(arm_by_seed: Mapping[int, float], base_by_seed: Mapping[int, float]) -> Paired | None:
    """Paired comparison on the seeds present (and finite) in both arms; None if there are none."""
    seeds = tuple(sorted(s for s in arm_by_seed if s in base_by_seed
                         and math.isfinite(arm_by_seed[s]) and math.isfinite(base_by_seed[s])))
    if not seeds:
        return None
    diffs = np.asarray([arm_by_seed[s] - base_by_seed[s] for s in seeds])
    low, high = bootstrap_ci(diffs)
    return Paired(seeds=seeds, mean_diff=float(diffs.mean()), ci_low=low, ci_high=high,
                  num_positive=int((diffs > 0).sum()), num_negative=int((diffs < 0).sum()),
                  sign_p=sign_test(diffs))


def format_paired(p: Paired | None, digits: int = 3) -> str:
    """"+0.031 [+0.010, +0.052] (3+/0−, p=0.25)", with " n.s." after the CI when it spans 0."""
    if p is None:
        return "–"
    verdict = "" if p.significant else " n.s."
    signed = lambda x: f"{round(x, digits) + 0.0:+.{digits}f}"  # no "-0.000"
    return (f"{signed(p.mean_diff)} [{signed(p.ci_low)}, {signed(p.ci_high)}]"
            f"{verdict} ({p.num_positive}+/{p.num_negative}−, p={p.sign_p:.2g})")


# ------------------------------------------------------------------------ pre-declared readouts


def collapse_step(steps: Sequence[float], values: Sequence[float], fraction: float = 0.5,
                  consecutive: int = 2) -> float | None:
    """The step of the first of ``consecutive`` consecutive evaluations below ``fraction`` × the
    run's best evaluation so far (before them); None if the run never collapses. "So far": an
    early evaluation below a peak reached later is learning, not collapse."""
    best, run = -math.inf, 0
    for i, value in enumerate(values):
        if best > 0 and value < fraction * best:
            run += 1
            if run == consecutive:
                return float(steps[i - consecutive + 1])
        else:
            run = 0
            best = max(best, value)
    return None


def spike_steps(steps: Sequence[float], values: Sequence[float], factor: float = 20.0,
                min_history: int = 5) -> list[float]:
    """Steps whose value exceeds ``factor`` × the running median of every earlier value (after
    ``min_history`` of them): pre-clip gradient-norm spikes."""
    out = []
    for i in range(min_history, len(values)):
        if values[i] > factor * float(np.median(values[:i])):
            out.append(float(steps[i]))
    return out


def _series(records: Sequence[Mapping], metric: str) -> tuple[list[float], list[float]]:
    pairs = [(float(r["step"]), float(r[metric])) for r in records
             if "step" in r and isinstance(r.get(metric), (int, float))
             and math.isfinite(r[metric])]
    return [s for s, _ in pairs], [v for _, v in pairs]


Readout = Callable[[Sequence[Mapping]], "float | None"]


def collapse_readout(metric: str = "eval/pass@1", fraction: float = 0.5,
                     consecutive: int = 2) -> Readout:
    """A run's collapse step of ``metric`` (`collapse_step`), None if it never collapses."""
    def readout(records):
        return collapse_step(*_series(records, metric), fraction, consecutive)
    readout.description = (f"first of {consecutive} consecutive {metric} evaluations below "
                           f"{fraction:g}× the run's best so far (none: never)")
    return readout


def spike_readout(metric: str = "train/grad_norm_max", factor: float = 20.0,
                  min_history: int = 5) -> Readout:
    """A run's number of ``metric`` spikes (`spike_steps`)."""
    def readout(records):
        return float(len(spike_steps(*_series(records, metric), factor, min_history)))
    readout.description = (f"steps with {metric} > {factor:g}× its running median "
                           f"(after {min_history} steps)")
    return readout


def slope_readout(metric: str = "mismatch/abs_logp_diff_mean", per_steps: float = 100.0
                  ) -> Readout:
    """A run's least-squares slope of ``metric`` against the step, per ``per_steps`` steps (e.g.
    how fast |Δlogp| grows over training); None with fewer than two points."""
    def readout(records):
        steps, values = _series(records, metric)
        if len(steps) < 2 or len(set(steps)) < 2:
            return None
        return float(np.polyfit(steps, values, 1)[0] * per_steps)
    readout.description = f"least-squares slope of {metric} per {per_steps:g} steps"
    return readout
