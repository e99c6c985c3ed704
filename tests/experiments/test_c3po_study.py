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


STUDY_4_TASK = dict(min_size=1, max_size=12, size_tail=1.5, show_steps=True)
STUDY_4B_TASK = dict(min_size=2, max_size=10, size_tail=1.5, eval_fraction=0.25,
                     show_steps=True)


@pytest.mark.parametrize("name, seeds, task_kwargs, learning_rate", [
    ("parity", "PARITY_SEEDS", STUDY_4_TASK, 2e-4),
    ("parity_v2", "PARITY_V2_SEEDS", STUDY_4B_TASK, 1e-4)])
def test_parity_study_pairs_sync_and_paced_on_one_eval_set(experiment_file, name, seeds,
                                                           task_kwargs, learning_rate):
    study = experiment_file("c3po")
    runs = study.get_sweep(name)
    parity = [r for r in runs if r["study"] == name]
    assert {r["label"] for r in parity} == {"sync", "paced"} and study.BASELINE[name] == "sync"
    assert len(parity) == 2 * len(getattr(study, seeds)) >= 6  # ≥ 3 paired seeds
    sft = {r["name"]: r for r in runs if r["study"] == "sft"}
    evals = set()
    for r in parity:  # both arms of seed s start from sft_s<s>; one eval set for all
        seed = r["name"].rsplit("_s", 1)[1]
        init = f"sft_s{seed}" if name == "parity" else study.PARITY_V2_SFT  # 4b: one shared
        assert r["init"] == init and f"seed={init[5:]}" in sft[init]["arg"]
        cfg = experiment.from_config_dict(study.get_config(r["arg"]))
        assert cfg.scheduler.mode == r["label"] and cfg.seed == int(seed)
        evals.add((cfg.eval.num_prompts, cfg.eval.greedy_engine, cfg.eval.every,
                   cfg.rl.num_steps, cfg.rl.optim.learning_rate,
                   tuple(sorted(dict(cfg.task.kwargs).items()))))
    assert evals == {(study.PARITY_EVAL_PROMPTS, "float32", 20, 60, learning_rate,
                      tuple(sorted(task_kwargs.items())))}
    assert study.PARITY_V2_PILOT_SEED not in study.PARITY_V2_SEEDS
    pilot = experiment.from_config_dict(study.get_config(f"mode=sync,{name},lr=5e-5"))
    assert pilot.rl.optim.learning_rate == 5e-5
    with pytest.raises(ValueError, match="lr='fast' is invalid.*rl.optim.learning_rate"):
        study.get_config(f"mode=sync,{name},lr=fast")


def test_parity_v2_eval_set_keeps_the_training_size_mix(experiment_file):
    """Study 4b's point: its held-out problems are as hard as its training draws (study 4's
    were mostly 2-12 digit sums while half the training draws were one-digit)."""
    from ring_jax.data.tokenizer import get_tokenizer
    from ring_jax.train.evaluate import eval_records
    study = experiment_file("c3po")
    cfg = experiment.from_config_dict(study.get_config("mode=sync,seed=0,parity_v2"))
    task = tasks.get(cfg.task.name, **dict(cfg.task.kwargs))
    size = lambda prompt: len(prompt.split("+")[0])  # digits of the first operand
    records = eval_records(task, get_tokenizer("byte"), cfg.eval.num_prompts)
    eval_sizes = [size(r["prompt_text"]) for r in records]
    train_sizes = [size(task.sample(i, 0).prompt) for i in range(2000)]
    assert min(eval_sizes) == min(train_sizes) == 2 and max(eval_sizes) == 10
    for digits in range(2, 11):
        eval_share = eval_sizes.count(digits) / len(eval_sizes)
        train_share = train_sizes.count(digits) / len(train_sizes)
        assert abs(eval_share - train_share) < 0.04, (digits, eval_share, train_share)
    lengths = sorted(len(task.sample(i, 0).thoughts) for i in range(400))
    assert lengths[int(0.95 * len(lengths))] >= 2.5 * lengths[len(lengths) // 2]  # a long tail
    assert cfg.scheduler.sampling.max_new_tokens >= lengths[-1] + 20


def _fake_run(root, name, evals, lengths=(20.0,)):
    os.makedirs(root / name)
    with open(root / name / "metrics.jsonl", "w") as f:
        for i, value in enumerate(evals):
            f.write(json.dumps({"step": 10 * i, "eval/pass@1": value}) + "\n")
        for step, length in enumerate(lengths, 1):
            f.write(json.dumps({"step": step, "sched/trained_response_len_mean": length}) + "\n")
    return str(root / name)


def test_equivalence_table_and_readouts_hand_checked(experiment_file, tmp_path):
    study = experiment_file("c3po")
    # Last-2 means: sync 0.5 / 0.6 / 0.4; paced +0.01, +0.03, +0.02 above them (the first
    # evaluation is outside the window): d = (0.01, 0.03, 0.02), 90% t-CI [+0.003, +0.037]
    # (tests/experiments/test_stats.py) -> equivalent within ±0.05.
    groups = {"sync": [], "paced": []}
    for seed, base in enumerate((0.5, 0.6, 0.4)):
        d = (0.01, 0.03, 0.02)[seed]
        groups["sync"].append(_fake_run(tmp_path, f"sync_s{seed}", [0.0] + [base] * 4))
        groups["paced"].append(_fake_run(tmp_path, f"paced_s{seed}",
                                         [0.9, base + d - 0.01, base + d + 0.01, base + d,
                                          base + d], lengths=(30.0, 40.0)))
    text = study.equivalence_table(groups)
    assert "- paced: +0.020 [+0.003, +0.037] 90% CI" in text
    assert text.rstrip().endswith("equivalent within ±0.05; per seed s0 +0.010, s1 +0.030, "
                                  "s2 +0.020")
    assert study.equivalence_table({"paced": groups["paced"]}) == ""  # no baseline arm
    records = [json.loads(line) for line in open(os.path.join(groups["paced"][0],
                                                              "metrics.jsonl"))]
    assert study.READOUTS["trained len mean"](records) == pytest.approx(35.0)
    assert study.READOUTS["RL gain pass@1 pts"](records) == pytest.approx(100 * (0.51 - 0.9))


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
    blocks = [block.splitlines() for block in text.split("\n\n")]
    table = next(b for b in blocks if b[0].startswith("| arm | seeds | pass@1"))
    work = next(b for b in blocks if "speed-up over sync" in b[0])
    assert "RL s" in table[0] and "purged %" in table[0] and len(table) == 4
    # One seed: the equivalence test has no variance to work with and says so.
    assert "- c3po: – (fewer than 2 paired seeds)" in text
    # The work table: the sync arm is 1.00x itself; every cell is a number.
    assert "speed-up over sync" in work[0] and len(work) == 4
    sync_row = next(line for line in work if line.startswith("| sync |"))
    assert sync_row.rstrip(" |").endswith("1.00 ± 0.00")
    assert "nan" not in text and "–" not in "".join(work[2:])
