"""experiments/ci_figures.py: the bootstrap band by hand, and both figures from synthetic runs."""
from __future__ import annotations

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "experiments"))  # ci_figures imports plot, stats
import ci_figures  # noqa: E402


def test_bootstrap_band_by_hand():
    # One seed: no spread, the band is the value. Two seeds 0 and 1: resampled means are 0,
    # 0.5, 1 with probability 1/4, 1/2, 1/4, so the 95% band is [0, 1] around 0.5 (a band of
    # ± the sample std would be 0.5 ± 0.71).
    mean, low, high = ci_figures.bootstrap_band(np.asarray([[3.0], [4.0]]))
    assert mean.tolist() == low.tolist() == high.tolist() == [3.0, 4.0]
    mean, low, high = ci_figures.bootstrap_band(np.asarray([[0.0, 1.0]]))
    assert (mean[0], low[0], high[0]) == (0.5, 0.0, 1.0)
    values = np.random.default_rng(1).normal(size=(3, 5))
    mean, low, high = ci_figures.bootstrap_band(values)
    assert np.all(low <= mean) and np.all(mean <= high)
    again = ci_figures.bootstrap_band(values)
    assert np.array_equal(again[1], low)  # a fixed generator seed: the same figure every time


def _write_run(path, offset, steps=6):
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step in range(steps):
            f.write(json.dumps({"step": step, "rl/reward_mean": offset + 0.1 * step}) + "\n")


def test_paired_differences_pair_by_seed_and_figures_are_written(tmp_path):
    groups = {"control": [], "none": []}
    for seed, shift in ((0, 0.0), (1, 1.0)):
        for label, offset in (("control", 0.0), ("none", -0.25)):
            path = str(tmp_path / f"{label}_s{seed}")
            _write_run(path, offset + shift)
            groups[label].append(path)
    arm = ci_figures.seed_curves(groups["none"], "rl/reward_mean")
    base = ci_figures.seed_curves(groups["control"], "rl/reward_mean")
    steps, diffs = ci_figures._paired(arm, base)
    # Paired by seed, the seed shift cancels: every difference is -0.25 (unpaired bands would
    # span the shift of 1.0).
    assert steps.tolist() == list(range(6)) and np.allclose(diffs, -0.25)
    paths = ci_figures.plot_ci(groups, str(tmp_path / "fig"), ["rl/reward_mean"], "control",
                               window=1)
    assert os.path.basename(paths["paired"]) == "paired_vs_control.png"
    assert all(os.path.getsize(p) > 0 for p in paths.values())


def test_unknown_baseline_falls_back_to_the_first_arm(tmp_path):
    _write_run(str(tmp_path / "a_s0"), 0.0)
    paths = ci_figures.plot_ci({"a": [str(tmp_path / "a_s0")]}, str(tmp_path / "fig"),
                               ["rl/reward_mean"], baseline="missing")
    assert paths["paired"].endswith("paired_vs_a.png")
