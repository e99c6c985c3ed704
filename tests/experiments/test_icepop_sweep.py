"""experiments/icepop.py + experiments/sweep.py: the sweep's shape (fast) and one tiny arm run
end to end through sweep.py into tmp_path (slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ring_jax.train import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "icepop.py")
SWEEP = os.path.join(ROOT, "experiments", "sweep.py")


def test_sweep_lists_every_arm_with_three_seeds_and_valid_configs(experiment_file):
    icepop = experiment_file("icepop")
    runs = icepop.get_sweep("local")
    by_study = {}
    for r in runs:
        by_study.setdefault(r["study"], {}).setdefault(r["label"], []).append(r)
    assert set(by_study["stability"]) == {"none", "tis", "icepop", "kpop", "r3", "r3_icepop"}
    assert list(by_study["sensitivity"]) == list(icepop.SENSITIVITY_ARMS)
    assert icepop.BASELINE["sensitivity"] in by_study["sensitivity"]
    assert set(by_study["long"]) == {"none_long", "tis_long", "icepop_long"}
    long_cfg = experiment.from_config_dict(icepop.get_config("correction=none,long,local"))
    assert long_cfg.rl.num_steps == 200
    for study in ("stability", "sensitivity", "long"):
        for label, arm_runs in by_study[study].items():
            assert len(arm_runs) >= 3, label
            assert all(r["init"] in {s["name"] for s in runs if s["study"] == "sft"}
                       for r in arm_runs)
    # Every run's config validates, and the arm's knobs reach the loss / precision.
    for r in runs:
        cfg = experiment.from_config_dict(icepop.get_config(r["arg"]))
        if r["study"] != "calibration":
            assert cfg.precision.fp8_expert_weights and cfg.precision.router_noise_std == 1.0
    bf16 = experiment.from_config_dict(icepop.get_config("correction=none,nofp8,noise=0"))
    assert not bf16.precision.fp8_expert_weights and bf16.precision.router_noise_std == 0.0
    cfg = experiment.from_config_dict(icepop.get_config("correction=icepop,alpha=0.2,beta=10"))
    assert (cfg.rl.loss.alpha, cfg.rl.loss.beta) == (0.2, 10.0)
    cfg = experiment.from_config_dict(icepop.get_config("correction=kpop,phi=2,r3"))
    assert cfg.rl.loss.kpop_phi == 2.0 and cfg.rl.router_replay and cfg.engine.record_expert_ids
    assert experiment.from_config_dict(icepop.get_config("sft,local")).rl.num_steps == 0
    removed = experiment.from_config_dict(icepop.get_config("correction=icepop,masked=removed"))
    assert not removed.rl.loss.masked_in_denominator
    assert experiment.from_config_dict(icepop.get_config("")).rl.loss.masked_in_denominator
    with pytest.raises(ValueError, match="masked="):
        icepop.get_config("masked=dropped")
    with pytest.raises(ValueError, match="unknown args"):
        icepop.get_config("corection=tis")


def test_run_mean_readouts_average_every_logged_step(experiment_file):
    icepop = experiment_file("icepop")
    records = [{"step": 1, "train/grad_norm": 1.0, "mismatch/masked_frac_above": 0.0},
               {"step": 2, "train/grad_norm": 3.0}, {"step": 3, "eval/pass@1": 0.5}]
    got = {name: fn(records) for name, fn in icepop.READOUTS.items()}
    assert got == {"train/grad_norm (run mean)": 2.0,
                   "mismatch/masked_frac_above (run mean)": 0.0,
                   "mismatch/masked_frac_below (run mean)": None}


def test_select_brings_the_sft_runs_first(experiment_file):
    sweep = experiment_file("sweep")
    icepop = experiment_file("icepop")
    runs = sweep.select(icepop.get_sweep("smoke"), "stability", seeds=[1], arms=["tis"])
    assert [r["name"] for r in runs] == ["sft_s1", "tis_s1"]
    cmd = sweep.command("experiments/icepop.py", runs[1], "/r", python="py")
    assert cmd[-2:] == ["--config.init_from=/r/sft_s1/sft", "--config.sft.num_steps=0"]


@pytest.mark.slow
def test_one_tiny_arm_runs_through_the_sweep(tmp_path):
    root, figures = tmp_path / "runs", tmp_path / "figures"
    args = [sys.executable, SWEEP, f"--config={CONFIG}:smoke", "--study=stability",
            "--seeds=0", "--arms=icepop", f"--root={root}", f"--figures={figures}"]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name in ("sft_s0", "icepop_s0"):
        assert (root / name / "SWEEP_DONE").exists()
    records = [json.loads(line) for line in open(root / "icepop_s0" / "metrics.jsonl")]
    assert max(r["step"] for r in records) == 3
    assert any("mismatch/masked_frac_above" in r for r in records)
    config = json.load(open(root / "icepop_s0" / "config.json"))
    assert config["init_from"] == str(root / "sft_s0" / "sft") and config["sft"]["num_steps"] == 0
    assert (figures / "stability" / "curves_vs_step.png").exists()
    assert "icepop" in (figures / "stability" / "summary.md").read_text()
    table = (figures / "stability" / "table.md").read_text().splitlines()
    assert table[2].startswith("| icepop | 1 | ") and len(table) == 3
    # Rerunning skips both finished runs.
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 2
