"""experiments/stats.py: hand-checked cases of every statistic the study tables print."""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("_stats", os.path.join(ROOT, "experiments",
                                                                      "stats.py"))
stats = importlib.util.module_from_spec(_spec)
sys.modules["_stats"] = stats  # dataclasses look their module up there
_spec.loader.exec_module(stats)


def test_sample_std_uses_ddof_1():
    # sqrt(((1-2.5)^2 + (2-2.5)^2 + (3-2.5)^2 + (4-2.5)^2) / 3) = sqrt(5/3); ddof=0 gives 1.118.
    assert stats.sample_std([1, 2, 3, 4]) == pytest.approx(math.sqrt(5 / 3))
    assert math.isnan(stats.sample_std([1.0]))
    assert stats.mean_std_cell([1, 2, 3, 4], 2) == "2.50 ± 1.29"
    assert stats.mean_std_cell([0.5], 2) == "0.50" and stats.mean_std_cell([], 2) == "–"


def test_last_evaluations_mean():
    assert stats.last_evaluations_mean([0.1, 0.2, 0.6, 0.8], 2) == pytest.approx(0.7)
    assert stats.last_evaluations_mean([0.4], 3) == pytest.approx(0.4)


def test_sign_test_exact_binomial():
    assert stats.sign_test([1, 1, 1, 1, 1]) == pytest.approx(2 / 32)  # 0.0625: not < 0.05
    assert stats.sign_test([1, 2, 3, 4, 5, 6]) == pytest.approx(2 / 64)
    assert stats.sign_test([1, 1, -1]) == 1.0  # 2 * (1 + 3) / 8, capped at 1
    assert stats.sign_test([1, 1, 1, 1, 1, 0]) == pytest.approx(2 / 32)  # the tie is dropped
    assert stats.sign_test([0, 0]) == 1.0


def test_bootstrap_ci_hand_checked():
    # Two seeds with differences 0 and 1: resampled means are 0, 0.5, 1 with probabilities
    # 1/4, 1/2, 1/4, so the 2.5% and 97.5% quantiles are 0 and 1.
    assert stats.bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    # A constant difference has a zero-width CI at that value.
    assert stats.bootstrap_ci([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2))
    # Fixed bootstrap seed: the same table every time.
    diffs = [0.05, -0.02, 0.11, 0.04, 0.07]
    assert stats.bootstrap_ci(diffs) == stats.bootstrap_ci(diffs)
    low, high = stats.bootstrap_ci(diffs)
    assert min(diffs) <= low < sum(diffs) / len(diffs) < high <= max(diffs)


def test_paired_differences_pair_by_seed_and_print_ns_when_the_ci_spans_zero():
    base = {0: 0.50, 1: 0.60, 2: 0.40, 3: 0.70}
    better = {0: 0.55, 1: 0.66, 2: 0.43, 9: 0.99}  # seed 9 has no partner, seed 3 is missing
    p = stats.paired(better, base)
    assert p.seeds == (0, 1, 2)
    assert p.mean_diff == pytest.approx((0.05 + 0.06 + 0.03) / 3)
    assert p.significant and (p.num_positive, p.num_negative) == (3, 0)
    assert p.sign_p == pytest.approx(0.25)
    cell = stats.format_paired(p)
    assert cell.startswith("+0.047 [") and "n.s." not in cell and "3+/0−" in cell
    # Unpaired, the spread between seeds (0.4..0.7) would swamp a 0.05 gain; paired it does not.
    mixed = stats.paired({0: 0.55, 1: 0.55, 2: 0.45}, base)
    assert not mixed.significant and " n.s. " in stats.format_paired(mixed)
    assert stats.paired({5: 1.0}, base) is None and stats.format_paired(None) == "–"


def test_collapse_step_rule():
    steps = [0, 25, 50, 75, 100, 125, 150]
    # Best so far 0.8 at step 50; 0.5 is not below 0.4; 0.35 and 0.3 are: collapse at 100.
    assert stats.collapse_step(steps, [0.1, 0.6, 0.8, 0.5, 0.35, 0.3, 0.7]) == 100
    # One dip alone is not a collapse.
    assert stats.collapse_step(steps[:5], [0.8, 0.3, 0.5, 0.3, 0.6]) is None
    # Low early evaluations before the peak are learning, not collapse (the best *so far*).
    assert stats.collapse_step(steps[:4], [0.1, 0.1, 0.8, 0.8]) is None
    readout = stats.collapse_readout()
    records = [{"step": s, "eval/pass@1": v} for s, v in zip(steps, [0.6, 0.2, 0.1, 0, 0, 0, 0])]
    records.insert(2, {"step": 30, "rl/reward_mean": 0.5})  # a step without an evaluation
    assert readout(records) == 25 and "0.5×" in readout.description


def test_spike_rule():
    steps = list(range(8))
    # Running median of the earlier values is 1: 25 > 20 is a spike, 15 is not.
    assert stats.spike_steps(steps, [1, 1, 1, 1, 1, 25, 15, 1]) == [5]
    assert stats.spike_steps(steps[:3], [1, 1, 100]) == []  # too little history
    records = [{"step": s, "train/grad_norm_max": v}
               for s, v in zip(steps, [1, 2, 1, 2, 1, 50, 1, 41])]
    assert stats.spike_readout()(records) == 2.0


def test_slope_readout():
    # |Δlogp| = 0.01 + 0.002 · step/10 -> slope 0.02 per 100 steps, exactly.
    records = [{"step": s, "mismatch/abs_logp_diff_mean": 0.01 + 0.0002 * s}
               for s in range(0, 50, 5)]
    assert stats.slope_readout()(records) == pytest.approx(0.02)
    assert stats.slope_readout()(records[:1]) is None


def test_t_distribution_matches_tables():
    # df = 2 has a closed form, F(t) = 1/2 + t / (2·sqrt(2 + t²)); printed tables give
    # t_{0.95} = 6.314 (df 1), 2.920 (df 2), 2.132 (df 4), 1.833 (df 9).
    for t in (-5.0, -1.0, 0.0, 0.3, 4.0):
        assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    for df, t95 in ((1, 6.3138), (2, 2.9200), (4, 2.1318), (9, 1.8331)):
        assert stats.t_quantile(0.95, df) == pytest.approx(t95, abs=1e-4)
        assert stats.t_cdf(t95, df) == pytest.approx(0.95, abs=1e-4)
    with pytest.raises(ValueError, match="quantile q=1"):
        stats.t_quantile(1.0, 3)


def test_tost_hand_checked():
    # d = (0.01, 0.03, 0.02): mean 0.02, s = 0.01, se = 0.01/√3 = 0.0057735; the 90% CI is
    # 0.02 ± 2.919986·se = [0.003141, 0.036859], inside ±0.05 -> equivalent. One-sided p's with
    # the df-2 closed form: t⁺ = (0.02 − 0.05)/se = −√27, p⁺ = 1/2 − √27/(2√29) = 0.017536;
    # t⁻ = 0.07/se = 12.124, p⁻ = 1/2 − 12.124/(2√149) = 0.003377; p = max = 0.017536.
    # A z-interval (1.645·se) would give [0.0105, 0.0295]; a 95% two-sided t-CI ±4.303·se.
    e = stats.tost([0.01, 0.03, 0.02], margin=0.05)
    assert (e.num_seeds, e.mean_diff) == (3, pytest.approx(0.02))
    assert (e.ci_low, e.ci_high) == (pytest.approx(0.003141, abs=1e-6),
                                     pytest.approx(0.036859, abs=1e-6))
    assert e.p_value == pytest.approx(0.5 - math.sqrt(27) / (2 * math.sqrt(29)), abs=1e-9)
    assert e.verdict == stats.EQUIVALENT
    assert stats.format_equivalence(e) == ("+0.020 [+0.003, +0.037] 90% CI, TOST p=0.018 "
                                           "(3 seeds): equivalent within ±0.05")
    # The same differences shifted by +0.07: CI [0.0731, 0.1069] entirely above +0.05.
    far = stats.tost([0.08, 0.10, 0.09], margin=0.05)
    assert far.verdict == stats.NOT_EQUIVALENT and far.p_value > 0.5
    # s = 0.03: CI 0.03 ± 2.92·0.01732 = [−0.0206, 0.0806] straddles +0.05.
    wide = stats.tost([0.0, 0.06, 0.03], margin=0.05)
    assert wide.verdict == stats.INCONCLUSIVE and wide.p_value > 0.05
    assert wide.ci_high == pytest.approx(0.03 + 2.919986 * 0.03 / math.sqrt(3), abs=1e-5)


def test_tost_edge_cases():
    assert stats.tost([0.01], margin=0.05) is None  # one seed: no variance
    assert stats.format_equivalence(None).startswith("–")
    assert stats.tost([0.01, float("nan")], margin=0.05) is None  # nan dropped -> one left
    same = stats.tost([0.01, 0.01, 0.01], margin=0.05)  # s = 0: a zero-width CI at the mean
    assert (same.ci_low, same.ci_high, same.verdict) == (0.01, 0.01, stats.EQUIVALENT)
    assert stats.tost([0.07, 0.07], margin=0.05).verdict == stats.NOT_EQUIVALENT
    # Symmetric: negating the differences mirrors the CI and keeps the p-value.
    a, b = stats.tost([0.01, -0.04, 0.02, 0.0], 0.05), stats.tost([-0.01, 0.04, -0.02, 0.0], 0.05)
    assert (a.ci_low, a.p_value) == (pytest.approx(-b.ci_high), pytest.approx(b.p_value))
    with pytest.raises(ValueError, match="margin=0"):
        stats.tost([0.0, 0.1], margin=0.0)
    with pytest.raises(ValueError, match="alpha=0.5"):
        stats.tost([0.0, 0.1], margin=0.05, alpha=0.5)
