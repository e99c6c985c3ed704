"""experiments/stability.py (study 2b, issue 13): arms that differ only in the mismatch and its
correction, the sweep's shape, the pre-declared readouts (fast), and the smoke size run end to
end through sweep.py into a paired table (slow)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ring_jax.train import derive, experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "stability.py")
SWEEP = os.path.join(ROOT, "experiments", "sweep.py")


def _cfg(stability, arg):
    return experiment.from_config_dict(stability.get_config(arg))


def test_arms_differ_only_in_the_mismatch_and_the_correction(experiment_file):
    stability = experiment_file("stability")
    cfgs = {label: _cfg(stability, f"{arm},seed=3,local") for label, arm in
            stability.ARMS.items()}
    control = cfgs["control"]
    assert control.precision.dtype == "float32" and not control.precision.has_mismatch_knob
    for label, cfg in cfgs.items():
        # The design's fixed settings: sync, dropless, several off-policy updates, no clipping.
        assert cfg.scheduler.mode == "sync" and cfg.rl.num_minibatches == 4
        assert cfg.model.capacity_factor >= cfg.model.num_experts / cfg.model.num_experts_per_tok
        assert cfg.model.num_moe_layers == 2 and cfg.rl.optim.clip_norm == 0.0
        assert cfg.eval.num_prompts >= 256 and cfg.eval.every == 25 and cfg.rl.num_steps == 300
        derive.derive(cfg)  # a mismatch arm passes the dropless-trainer check
        if label != "control":
            assert cfg.precision.dtype == "bfloat16"
            assert cfg.precision.expert_scale_error_std == stability.DOSE
            assert cfg.precision.expert_scale_error_seed == 3  # ε_e drawn per run seed
        # Everything but the correction and the engine's precision equals the control's.
        same = dataclasses.replace(cfg, precision=control.precision,
                                   rl=dataclasses.replace(cfg.rl, loss=control.rl.loss))
        assert same == control, label
    assert cfgs["tis"].rl.loss.correction == "tis"
    assert cfgs["icepop"].rl.loss.correction == "icepop"
    assert _cfg(stability, "correction=none,dose=0.3").precision.expert_scale_error_std == 0.3
    with pytest.raises(ValueError, match="dose=.*fp32"):
        stability.get_config("fp32,dose=0.3")
    with pytest.raises(ValueError, match="unknown args"):
        stability.get_config("correction=none,lr=1")


def test_sweep_pairs_every_arm_over_five_seeds_against_both_baselines(experiment_file):
    stability = experiment_file("stability")
    runs = stability.get_sweep("local")
    sft = {r["name"] for r in runs if r["study"] == "sft"}
    assert sft == {f"sft_s{s}" for s in range(5)}
    by_study = {}
    for r in runs:
        if r["study"] != "sft":
            by_study.setdefault(r["study"], []).append(r)
            assert r["init"] == f"sft_s{r['name'].rsplit('_s', 1)[1]}"
    assert set(by_study) == set(stability.BASELINE) == {"vs_control", "vs_tis"}
    # Both studies name the same workdirs: each run happens once, tabulated twice.
    names = [sorted(r["name"] for r in study_runs) for study_runs in by_study.values()]
    assert names[0] == names[1] and len(names[0]) == 5 * 5
    pilot = stability.get_sweep("pilot")
    assert [r["name"] for r in pilot if r["study"] == "pilot"] == [
        "pilot_control_s0"] + [f"pilot_none_dose{d:g}_s0" for d in stability.PILOT_DOSES]
    assert {r["init"] for r in pilot if r["init"]} == {"sft_s0"}
    with pytest.raises(ValueError, match="local, smoke or pilot"):
        stability.get_sweep("tiny")


def test_masked_per_mille_readouts_by_hand(experiment_file):
    stability = experiment_file("stability")
    records = [{"step": 1, "mismatch/masked_frac": 0.001},
               {"step": 2, "mismatch/masked_frac": 0.003},
               {"step": 3},  # an evaluation-only record: skipped
               {"step": 101, "mismatch/masked_frac": float("nan")}]
    mean = stability.READOUTS["masked ‰"](records)
    slope = stability.READOUTS["masked ‰ slope"](records)
    # 1‰ and 3‰: mean 2‰, +2‰ per step = +200‰ per 100 steps (a ratio-of-fractions bug gives
    # 0.002 and 0.2; counting the nan would give nan).
    assert mean == pytest.approx(2.0) and slope == pytest.approx(200.0)
    assert stability.READOUTS["masked ‰"]([{"step": 1}]) is None


@pytest.mark.slow
def test_smoke_study_runs_through_the_sweep_into_a_paired_table(tmp_path):
    root, figures, extract = tmp_path / "runs", tmp_path / "figures", tmp_path / "extract"
    args = [sys.executable, SWEEP, f"--config={CONFIG}:smoke", "--seeds=0",
            "--arms=control,none", f"--root={root}", f"--figures={figures}",
            f"--extract={extract}"]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(line) for line in open(root / "none_s0" / "metrics.jsonl")]
    assert max(r["step"] for r in records) == 3
    gaps = [r["mismatch/abs_logp_diff_mean"] for r in records
            if "mismatch/abs_logp_diff_mean" in r]
    control = [r["mismatch/abs_logp_diff_mean"] for r in map(
        json.loads, open(root / "control_s0" / "metrics.jsonl"))
        if "mismatch/abs_logp_diff_mean" in r]
    assert min(gaps) > 0 and max(control) < min(gaps)  # the control engine has no mismatch
    for study, baseline in (("vs_control", "control"), ("vs_tis", "tis")):
        table = (figures / study / "table.md").read_text()
        assert "collapse step" in table and "masked ‰" in table
    assert "Paired differences against control" in (figures / "vs_control" / "table.md"
                                                     ).read_text()
    assert (extract / "none_s0" / "metrics.jsonl").exists()


def test_the_narrow_extract_regenerates_the_same_table(experiment_file, tmp_path):
    stability, sweep = experiment_file("stability"), experiment_file("sweep")
    rng = np.random.default_rng(0)
    runs = []
    for label in ("control", "none"):
        for seed in (0, 1):
            name = f"{label}_s{seed}"
            os.makedirs(tmp_path / "root" / name)
            with open(tmp_path / "root" / name / "metrics.jsonl", "w") as f:
                for step in range(0, 61):
                    record = {"step": step, "time/rl_s": float(step), "time/unix": 1e9 + step,
                              "mismatch/abs_logp_diff_mean/pos_0_23": 0.1,
                              "sched/total/generated_tokens": 10.0 * step,
                              "sched/total/trained_responses": 8.0 * step,
                              "sched/total/purged_responses": 0.0}
                    record.update({m: float(rng.uniform()) for m in stability.STUDY_METRICS})
                    if step % 20:
                        del record["eval/pass@1"]
                    f.write(json.dumps(record) + "\n")
            (tmp_path / "root" / name / "SWEEP_DONE").write_text("1 s\n")
            runs.append(dict(name=name, label=label, study="vs_control"))
    keys = tuple(stability.STUDY_METRICS) + stability.EXTRACT_KEYS
    sweep.extract_runs(runs, str(tmp_path / "root"), str(tmp_path / "extract"), keys,
                       stability.EXTRACT_PREFIXES)
    kept = json.loads(open(tmp_path / "extract" / "none_s1" / "metrics.jsonl").readline())
    assert "mismatch/abs_logp_diff_mean/pos_0_23" not in kept and "time/unix" not in kept
    assert "sched/total/generated_tokens" not in kept and "mismatch/masked_frac" in kept
    tables = []
    for root in ("root", "extract"):
        groups = {label: [str(tmp_path / root / f"{label}_s{s}") for s in (0, 1)]
                  for label in ("control", "none")}
        tables.append(sweep.final_table(groups, last=stability.TABLE_LAST,
                                        metrics=stability.STUDY_METRICS,
                                        last_evals=stability.LAST_EVALS, baseline="control",
                                        readouts=stability.READOUTS))
    assert tables[0] == tables[1]
