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
