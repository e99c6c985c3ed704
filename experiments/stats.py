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

Equivalence ("the arms are on par") is a claim of its own, tested by `tost`: two one-sided
t-tests of the paired differences against a margin ±m declared before the runs, i.e. the 90%
t confidence interval of the mean difference inside (−m, +m) (`Equivalence.verdict`: equivalent,
not equivalent, or inconclusive when the interval straddles a bound). A CI that merely spans 0
("n.s.") says nothing about equivalence.

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


# ------------------------------------------------------------------------ equivalence (TOST)


def _regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, by its continued fraction
    (Lentz's method; Numerical Recipes §6.4), accurate to ~1e-12 for the t-distribution's use."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast below this point
        return 1.0 - _regularized_beta(1.0 - x, b, a)
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) of Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _regularized_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tail if t > 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The t with P(T ≤ t) = ``q`` (bisection on `t_cdf`)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile q={q} is invalid: it must lie in (0, 1)")
    low, high = -1e6, 1e6
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if t_cdf(mid, df) < q else (low, mid)
    return 0.5 * (low + high)


EQUIVALENT, NOT_EQUIVALENT, INCONCLUSIVE = "equivalent", "not equivalent", "inconclusive"


@dataclasses.dataclass(frozen=True)
class Equivalence:
    """A TOST of "the mean paired difference lies within ±margin"."""

    num_seeds: int
    mean_diff: float
    ci_low: float  # the (1 − 2α) t confidence interval of the mean difference
    ci_high: float
    p_value: float  # max of the two one-sided p-values; equivalent when < α
    margin: float
    alpha: float

    @property
    def verdict(self) -> str:
        """``equivalent`` (the CI inside ±margin, i.e. both one-sided tests reject at α), ``not
        equivalent`` (the CI entirely outside it) or ``inconclusive`` (it straddles a bound)."""
        if self.ci_low > -self.margin and self.ci_high < self.margin:
            return EQUIVALENT
        if self.ci_low >= self.margin or self.ci_high <= -self.margin:
            return NOT_EQUIVALENT
        return INCONCLUSIVE


def tost(diffs: Sequence[float], margin: float, alpha: float = 0.05) -> Equivalence | None:
    """Two one-sided t-tests (Schuirmann 1987) of the paired differences ``diffs`` (one per
    seed) against the equivalence margin ±``margin``:

        H0⁻: μ ≤ −margin, t⁻ = (d̄ + margin) / (s/√n), p⁻ = 1 − F(t⁻);
        H0⁺: μ ≥ +margin, t⁺ = (d̄ − margin) / (s/√n), p⁺ = F(t⁺);

    F the t CDF with n − 1 degrees of freedom, s the sample std (ddof=1). Equivalence at level
    α when both reject, max(p⁻, p⁺) < α, which is the (1 − 2α) CI d̄ ± t_{1−α, n−1}·s/√n lying
    inside (−margin, +margin). None with fewer than two differences (no variance estimate).
    Identical differences (s = 0) give a zero-width CI at d̄."""
    if not margin > 0:
        raise ValueError(f"margin={margin} is invalid: it must be > 0")
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha={alpha} is invalid: it must lie in (0, 0.5)")
    diffs = np.asarray([d for d in diffs if math.isfinite(d)], np.float64)
    n = len(diffs)
    if n < 2:
        return None
    mean, se = float(diffs.mean()), sample_std(diffs) / math.sqrt(n)
    if se == 0.0:
        inside = -margin < mean < margin
        return Equivalence(n, mean, mean, mean, 0.0 if inside else 1.0, margin, alpha)
    df = n - 1
    p_lower = 1.0 - t_cdf((mean + margin) / se, df)
    p_upper = t_cdf((mean - margin) / se, df)
    half_width = t_quantile(1.0 - alpha, df) * se
    return Equivalence(n, mean, mean - half_width, mean + half_width, max(p_lower, p_upper),
                       margin, alpha)


def format_equivalence(e: Equivalence | None, digits: int = 3) -> str:
    """"+0.004 [−0.021, +0.029] 90% CI, TOST p=0.003 (5 seeds): equivalent within ±0.05"."""
    if e is None:
        return "– (fewer than 2 paired seeds)"
    signed = lambda x: f"{round(x, digits) + 0.0:+.{digits}f}"
    bound = f"±{e.margin:g}"
    verdict = {EQUIVALENT: f"equivalent within {bound}",
               NOT_EQUIVALENT: f"not equivalent (outside {bound})",
               INCONCLUSIVE: f"inconclusive at {bound}"}[e.verdict]
    return (f"{signed(e.mean_diff)} [{signed(e.ci_low)}, {signed(e.ci_high)}] "
            f"{1 - 2 * e.alpha:.0%} CI, TOST p={e.p_value:.2g} ({e.num_seeds} seeds): {verdict}")
