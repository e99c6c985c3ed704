"""experiments/sweep.py's study table: sample std, last-N evaluations, paired CIs, readouts."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
_spec = importlib.util.spec_from_file_location("_sweep", os.path.join(ROOT, "experiments",
                                                                      "sweep.py"))
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def _write_run(directory, evals, grad_norms):
    os.makedirs(directory)
    with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "eval/pass@1": evals[0]}) + "\n")
        for step, grad_norm in enumerate(grad_norms, start=1):
            record = {"step": step, "rl/reward_mean": 0.5, "train/grad_norm_max": grad_norm,
                      "moe/dropped_frac": 0.0}
            if step in evals:
                record["eval/pass@1"] = evals[step]
            f.write(json.dumps(record) + "\n")


def test_table_pairs_arms_by_seed_and_marks_ns(tmp_path):
    # Seed s of every arm shares its problems; the baseline differs a lot between seeds, the
    # gain of "better" over it is small but the same sign on every seed.
    base_final = {0: 0.30, 1: 0.60, 2: 0.45}
    groups = {"base": [], "better": [], "noisy": []}
    for s, final in base_final.items():
        for label, delta in (("base", 0.0), ("better", 0.05 + 0.01 * s),
                             ("noisy", (-0.1, 0.1, 0.0)[s])):
            workdir = str(tmp_path / f"{label}_s{s}")
            v = final + delta
            grads = [1.0] * 8 + ([30.0] if label == "noisy" and s == 0 else [1.0])
            dip = 0.0 if label == "noisy" else v  # two evaluations below half the best
            _write_run(workdir, {0: 0.1, 3: v, 6: dip, 7: dip, 9: v}, grads)
            groups[label].append(workdir)
    readouts = {"collapse step": sweep.stats.collapse_readout(),
                "grad spikes": sweep.stats.spike_readout()}
    table = sweep.final_table(groups, last=3, last_evals=2, baseline="base", readouts=readouts)
    lines = table.splitlines()
    assert "sample std (ddof=1)" in lines[0] and "arm − base" in lines[0]
    cut = lines.index("Paired differences against base:")
    arms, paired = _rows(lines[:cut]), _rows(lines[cut:])
    base, noisy = arms["base"], arms["noisy"]
    # Sample std of 0.30, 0.60, 0.45 is 0.15 (ddof=0 would print 0.122).
    assert base["pass@1 final"] == "0.450 ± 0.150"
    assert base["pass@1 last 2 evals"] == "0.450 ± 0.150"
    # (0 + v) / 2 per seed: 0.1, 0.35, 0.225 -> sample std 0.125.
    assert noisy["pass@1 last 2 evals"] == "0.225 ± 0.125"
    assert noisy["collapse step"] == "6.0 ± 0.0 (3/3)" and base["collapse step"] == "– (0/3)"
    assert noisy["grad spikes"] == "0.3 ± 0.6 (3/3)"
    assert "base" not in paired
    # Δ final per seed: +0.05, +0.06, +0.07 -> mean +0.060, the CI inside [0.05, 0.07]: a
    # gain far below the seeds' spread (0.15) that pairing detects.
    better = paired["better"]["Δ pass@1 final"]
    assert better.startswith("+0.060 [+0.05") and "n.s." not in better and "3+/0−" in better
    # Δ −0.1, +0.1, 0.0: the CI spans 0.
    assert paired["noisy"]["Δ pass@1 final"].startswith("+0.000 [-0.") and \
        " n.s. " in paired["noisy"]["Δ pass@1 final"]
    assert paired["noisy"]["Δ collapse step"] == "–"  # the baseline never collapses


def _rows(lines):
    """{first cell: {header: cell}} of the markdown table in ``lines``."""
    table = [[c.strip() for c in ln.split("|")[1:-1]] for ln in lines
             if ln.startswith("| ")]
    header = table[0]
    return {cells[0]: dict(zip(header, cells)) for cells in table[1:]}


def test_extract_regenerates_the_same_table(tmp_path):
    # A committed extract keeps what the table reads: the table from the extract equals the
    # table from the full runs, and keys no table reads are dropped.
    root, out = tmp_path / "runs", tmp_path / "extract"
    runs = []
    for label, final in (("base", 0.4), ("arm", 0.5)):
        for s in range(2):
            name = f"{label}_s{s}"
            _write_run(str(root / name), {0: 0.1, 5: final + 0.1 * s / 3}, [1.0 / 3] * 6)
            with open(root / name / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": 6, "debug/unread": 1.0}) + "\n")
            open(root / name / sweep.DONE_MARKER, "w").close()
            runs.append({"name": name, "label": label, "study": "s", "init": "", "arg": ""})
    runs.append({"name": "unfinished_s0", "label": "x", "study": "s", "init": "", "arg": ""})
    assert sweep.extract_runs(runs, str(root), str(out)) == [r["name"] for r in runs[:-1]]

    def table(directory):
        return sweep.final_table({label: [str(directory / f"{label}_s{s}") for s in range(2)]
                                  for label in ("base", "arm")}, last=3)
    assert table(out) == table(root)
    extracted = open(out / "arm_s1" / "metrics.jsonl").read()
    assert "debug/unread" not in extracted and "eval/pass@1" in extracted
    assert "0.3333333," in extracted  # 7 significant digits
