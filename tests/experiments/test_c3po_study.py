"""experiments/c3po.py (study 4): the sweep's shape and configs (fast), and a tiny sync and
C3PO++ run through experiments/sweep.py into tmp_path (slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ring_jax.data import tasks
from ring_jax.train import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "c3po.py")
SWEEP = os.path.join(ROOT, "experiments", "sweep.py")


def test_sweep_arms_seeds_and_scheduler_knobs(experiment_file):
    study = experiment_file("c3po")
    runs = study.get_sweep("local")
    labels = {}
    for r in runs:
        labels.setdefault(r["study"], {}).setdefault(r["label"], []).append(r)
    assert set(labels["modes"]) == {"sync", "async", "c3po", "paced"}
    assert set(labels["budget"]) == {"c3po_phi512", "c3po_phi1024", "c3po_phi2048"}
    assert set(labels["staleness"]) == {"c3po_sigma1", "c3po_sigma2", "c3po_sigma4",
                                        "paced_sigma1"}
    # The defaults (Φ=1024, σ_max=4) are the modes study's c3po runs, not new workdirs.
    assert {r["name"] for r in labels["budget"]["c3po_phi1024"]} == {"c3po_s0", "c3po_s1",
                                                                      "c3po_s2"}
    sft_names = {r["name"] for r in runs if r["study"] == "sft"}
    for study_labels in labels.values():
        for arm_runs in study_labels.values():
            assert len(arm_runs) == 3 and all(r["init"] in sft_names | {None} for r in arm_runs)
    seen = {}
    for r in runs:  # a workdir shared by two studies must be the same run
        assert seen.setdefault(r["name"], r["arg"]) == r["arg"], r["name"]
        cfg = experiment.from_config_dict(study.get_config(r["arg"]))
        if r["study"] == "sft":
            assert cfg.rl.num_steps == 0
    cfgs = {label: experiment.from_config_dict(study.get_config(arg)).scheduler
            for label, arg in (("sync", "mode=sync"), ("async", "mode=async,k=2"),
                               ("c3po", "mode=c3po,phi=512,sigma=1"),
                               ("paced", "mode=paced,sigma=1"))}
    assert cfgs["sync"].mode == "sync"
    assert (cfgs["async"].mode, cfgs["async"].max_staleness) == ("async", 2)
    assert (cfgs["c3po"].token_budget, cfgs["c3po"].sigma_max) == (512, 1)
    assert (cfgs["paced"].mode, cfgs["paced"].sigma_max) == ("paced", 1)
    with pytest.raises(ValueError, match="unknown args"):
        study.get_config("budget=3")


def test_task_mix_is_long_tailed(experiment_file):
    cfg = experiment.from_config_dict(experiment_file("c3po").get_config(""))
    task = tasks.get(cfg.task.name, **dict(cfg.task.kwargs))
    lengths = sorted(len(task.sample(i, 0).thoughts) for i in range(400))
    median, p95 = lengths[len(lengths) // 2], lengths[int(0.95 * len(lengths))]
    assert p95 >= 4 * median  # most responses short, a few several times longer
    assert cfg.scheduler.sampling.max_new_tokens >= lengths[-1] + 20  # the longest fit


@pytest.mark.slow
def test_sync_and_c3po_run_through_the_sweep(tmp_path):
    root, figures = tmp_path / "runs", tmp_path / "figures"
    args = [sys.executable, SWEEP, f"--config={CONFIG}:smoke", "--study=modes", "--seeds=0",
            "--arms=sync,c3po", f"--root={root}", f"--figures={figures}"]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name in ("sync_s0", "c3po_s0"):
        records = [json.loads(line) for line in open(root / name / "metrics.jsonl")]
        rl_time = [r["time/rl_s"] for r in records if "time/rl_s" in r]
        assert len(rl_time) == 3 and rl_time == sorted(rl_time)
        config = json.load(open(root / name / "config.json"))
        assert config["scheduler"]["mode"] == name[:-3]
    assert (figures / "modes" / "curves_vs_time.png").exists()
    text = (figures / "modes" / "table.md").read_text()
    table, work = text.split("\n\n")[0].splitlines(), text.split("\n\n")[1].splitlines()
    assert "RL s" in table[0] and "purged %" in table[0] and len(table) == 4
    # The work table: the sync arm is 1.00x itself; every cell is a number.
    assert "speed-up over sync" in work[0] and len(work) == 4
    sync_row = next(line for line in work if line.startswith("| sync |"))
    assert sync_row.rstrip(" |").endswith("1.00 ± 0.00")
    assert "nan" not in text and "–" not in "".join(work[2:])
