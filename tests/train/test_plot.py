"""experiments/plot.py: seed grouping, mean ± std aggregation, figures and summary table."""
import json
import os

import numpy as np
import pytest


@pytest.fixture(scope="module")
def plot(experiment_file):
    return experiment_file("plot")


def _write_run(directory, rewards, evals, seconds_per_step):
    os.makedirs(directory)
    with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
        for i, reward in enumerate(rewards, start=1):
            record = {"step": i, "time/elapsed_s": i * seconds_per_step, "rl/reward_mean": reward}
            if i in evals:
                record["eval/pass@1"] = evals[i]
            f.write(json.dumps(record) + "\n")
        f.write('{"step": 99, "rl/rew')   # torn line of a killed run


def test_labels_group_seeds(plot):
    assert plot.default_label("runs/icepop_s3") == "icepop"
    assert plot.default_label("runs/icepop-seed12/") == "icepop"
    assert plot.default_label("runs/tis_seed=2") == "tis"
    assert plot.default_label("runs/plain") == "plain"
    assert plot.parse_runs(["A=x/one", "x/b_s0", "x/b_s1"]) == {"A": ["x/one"],
                                                               "b": ["x/b_s0", "x/b_s1"]}


def test_aggregation_hand_values(plot):
    run_a = [{"step": 1, "m": 1.0, "time/elapsed_s": 0.0}, {"step": 2, "m": 3.0,
                                                            "time/elapsed_s": 10.0}]
    run_b = [{"step": 1, "m": 3.0, "time/elapsed_s": 0.0}, {"step": 2, "m": float("nan"),
                                                            "time/elapsed_s": 20.0},
             {"step": 3, "m": 5.0, "time/elapsed_s": 30.0}]
    steps, mean, std, count = plot.aggregate_by_step([run_a, run_b], "m")
    np.testing.assert_array_equal(steps, [1, 2, 3])
    np.testing.assert_allclose(mean, [2.0, 3.0, 5.0])   # the NaN of run b is not averaged in
    np.testing.assert_allclose(std, [2 ** 0.5, 0.0, 0.0])  # sample std (ddof=1) of 1, 3
    np.testing.assert_array_equal(count, [2, 1, 1])
    grid, mean_t, _ = plot.aggregate_by_time([run_a, run_b], "m", num_points=3)
    # Common grid 0..10 s (the shorter run); run b is interpolated between 0 s and 30 s.
    np.testing.assert_allclose(grid, [0.0, 5.0, 10.0])
    np.testing.assert_allclose(mean_t, [(1 + 3) / 2, (2 + 3 + 1 / 3) / 2, (3 + 3 + 2 / 3) / 2])
    np.testing.assert_allclose(plot.smooth(np.array([1.0, 3.0, 5.0]), 2), [1.0, 2.0, 4.0])


def test_main_writes_figures_and_summary(plot, tmp_path, capsys):
    _write_run(tmp_path / "icepop_s0", [0.1, 0.5, 0.9], {2: 0.4, 3: 0.8}, 1.0)
    _write_run(tmp_path / "icepop_s1", [0.2, 0.4, 0.7], {2: 0.5, 3: 0.6}, 2.0)
    _write_run(tmp_path / "none_s0", [0.1, 0.2, 0.3], {3: 0.2}, 1.5)
    out = tmp_path / "figs"
    rc = plot.main([str(tmp_path / "icepop_s0"), str(tmp_path / "icepop_s1"),
                    str(tmp_path / "none_s0"), f"--out={out}",
                    "--metrics=eval/pass@1,rl/reward_mean"])
    assert rc == 0
    for name in ("curves_vs_step.png", "curves_vs_time.png"):
        data = open(out / name, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    table = open(out / "summary.md").read()
    # Final eval: seeds 0.8 and 0.6 -> 0.7 ± 0.1; final reward 0.9 and 0.7 -> 0.8 ± 0.1.
    assert "| icepop | 2 | 0.7 ± 0.14 | 0.8 ± 0.14 |" in table
    assert "| none | 1 | 0.2 | 0.3 |" in table
    assert table in capsys.readouterr().out


def test_no_metrics_is_an_error(plot, tmp_path):
    os.makedirs(tmp_path / "r")
    open(tmp_path / "r" / "metrics.jsonl", "w").write('{"step": 1, "other": 1.0}\n')
    with pytest.raises(ValueError, match="no metrics to plot"):
        plot.plot_groups({"r": [str(tmp_path / "r")]}, str(tmp_path / "out"))
