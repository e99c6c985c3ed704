"""Runs a config's ``get_sweep()`` one run after another, then draws each study's figures.

    python experiments/sweep.py --config=experiments/icepop.py:local --study=stability \
        --root=runs/icepop --figures=experiments/figures/stability

``--config=FILE:SIZE``: FILE's ``get_sweep(SIZE)`` lists the runs (dicts with "name", "arg",
"study", "label" and "init", see experiments/icepop.py). Each selected run is

    python -m ring_jax.main --config=FILE:<arg> --workdir=<root>/<name>
        [--config.init_from=<root>/<init>/sft --config.sft.num_steps=0]

in a subprocess, in order; a run whose ``init`` (its SFT warm start) is listed runs after it.
A run that finished is marked by ``<workdir>/SWEEP_DONE`` and skipped, so rerunning the command
resumes the sweep (a killed run resumes from its own last checkpoint). ``--study`` selects one
study (its SFT warm starts come along), ``--seeds`` a subset of seeds (``--seeds=0,1``),
``--arms`` a subset of labels. After the runs, `experiments/plot.py` draws each study's arms (one
label per arm, its seeds as mean ± std) into ``<figures>/<study>/`` (curves_vs_step.png,
curves_vs_time.png, summary.md) and writes ``table.md`` there: per arm, held-out pass@1 before
and after RL and each curve's mean over the last ``--last`` steps, mean ± std over seeds.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from typing import Callable, Sequence

# plot.py beside this file, and the repository root (config files import experiments.common;
# the runs' processes get it on PYTHONPATH too).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), REPO]
import numpy as np  # noqa: E402
import plot  # noqa: E402  (experiments/plot.py, beside this file)

DONE_MARKER = "SWEEP_DONE"
# The curves of issue 7's study 2 (metric names from ring_jax.rl.losses.finalize_metrics).
STUDY_METRICS = ("rl/reward_mean", "eval/pass@1", "train/grad_norm",
                 "mismatch/abs_logp_diff_max", "mismatch/abs_logp_diff_mean",
                 "mismatch/masked_frac_above", "mismatch/masked_frac_below",
                 "rl/entropy_all_tokens", "rl/entropy_masked_tokens")


def load_sweep(config: str) -> tuple[str, list[dict], dict]:
    """'FILE:SIZE' -> (FILE, FILE's get_sweep(SIZE), how to report it). FILE may set
    ``STUDY_METRICS`` (the curves drawn and tabulated), ``TIME_KEY`` (the wall-clock axis),
    ``TABLE_LAST`` (steps averaged per seed in table.md) and ``extra_table(groups) -> str``
    (markdown appended to table.md); defaults: study 2's."""
    path, _, size = config.partition(":")
    spec = importlib.util.spec_from_file_location("_sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = dict(metrics=getattr(module, "STUDY_METRICS", STUDY_METRICS),
                  time_key=getattr(module, "TIME_KEY", "time/elapsed_s"),
                  last=getattr(module, "TABLE_LAST", 10),
                  extra_table=getattr(module, "extra_table", None))
    return path, module.get_sweep(size), report


def select(runs: list[dict], study: str = "", seeds: Sequence[int] = (),
           arms: Sequence[str] = ()) -> list[dict]:
    """The runs of ``study`` (all if empty) restricted to ``seeds``/``arms`` labels, plus the SFT
    runs they initialise from, SFT runs first."""
    def seed_of(run):
        return int(run["name"].rsplit("_s", 1)[1])
    chosen = [r for r in runs if r["study"] != "sft" and (not study or r["study"] == study)
              and (not seeds or seed_of(r) in seeds) and (not arms or r["label"] in arms)]
    needed = {r["init"] for r in chosen if r["init"]}
    return [r for r in runs if r["name"] in needed] + chosen


def command(config_path: str, run: dict, root: str, python: str = sys.executable) -> list[str]:
    cmd = [python, "-m", "ring_jax.main", f"--config={config_path}:{run['arg']}",
           f"--workdir={os.path.join(root, run['name'])}"]
    if run["init"]:
        cmd += [f"--config.init_from={os.path.join(root, run['init'], 'sft')}",
                "--config.sft.num_steps=0"]
    return cmd


def run_all(config_path: str, runs: list[dict], root: str) -> dict[str, float]:
    """Runs each unfinished run; returns {name: seconds} of those run now. A failed run stops
    the sweep (its log is <root>/<name>.log)."""
    os.makedirs(root, exist_ok=True)
    times = {}
    for i, run in enumerate(runs):
        workdir = os.path.join(root, run["name"])
        if os.path.exists(os.path.join(workdir, DONE_MARKER)):
            print(f"[{i + 1}/{len(runs)}] {run['name']}: done, skipped", flush=True)
            continue
        cmd = command(config_path, run, root)
        print(f"[{i + 1}/{len(runs)}] {run['name']}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        with open(os.path.join(root, run["name"] + ".log"), "a") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env={
                **os.environ, "PYTHONPATH": os.pathsep.join(
                    filter(None, [REPO, os.environ.get("PYTHONPATH", "")]))})
        if rc:
            raise SystemExit(f"{run['name']} failed (exit {rc}); see "
                             f"{os.path.join(root, run['name'] + '.log')}")
        times[run["name"]] = time.perf_counter() - t0
        with open(os.path.join(workdir, DONE_MARKER), "w") as f:
            f.write(f"{times[run['name']]:.1f} s\n")
        print(f"    {times[run['name']]:.0f} s", flush=True)
    return times


def final_table(groups: dict[str, list[str]], last: int = 10,
                metrics: Sequence[str] = STUDY_METRICS) -> str:
    """Markdown table: per label, eval/pass@1 at the first and last evaluation (and averaged
    over the evaluations after the first), the seconds spent in RL steps (``time/rl_s``: no
    start-up, no evaluation), the % of finished responses purged for staleness, and each other
    metric averaged over each seed's last ``last`` steps (a per-step curve is noisy), then
    mean ± std over seeds. A metric a run never logged (e.g. the masked-token entropy of an arm
    that masks nothing) is "–"."""
    curves = [m for m in metrics if m != "eval/pass@1"]
    header = ["arm", "seeds", "pass@1 before RL", "pass@1 after RL",
              "pass@1 mean of RL evals", "RL s", "purged %"] + [
        f"{m} (last {last})" for m in curves]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, workdirs in groups.items():
        per_seed: dict[str, list[float]] = {}
        for workdir in workdirs:
            records = plot.read_metrics(workdir)
            _, evals = plot.series(records, "eval/pass@1")
            if len(evals):
                per_seed.setdefault("before", []).append(evals[0])
                per_seed.setdefault("after", []).append(evals[-1])
                if len(evals) > 1:  # every evaluation after step 0: less noisy than the last
                    per_seed.setdefault("during", []).append(float(np.mean(evals[1:])))
            _, rl_seconds = plot.series(records, "time/rl_s")
            if len(rl_seconds):
                per_seed.setdefault("rl_s", []).append(float(rl_seconds[-1]))
            totals = next((r for r in reversed(records) if "sched/total/trained_responses" in r),
                          None)
            if totals is not None:  # responses purged (C3PO++ staleness) / responses finished
                purged = totals.get("sched/total/purged_responses", 0.0)
                per_seed.setdefault("purged", []).append(
                    100.0 * purged / max(purged + totals["sched/total/trained_responses"], 1.0))
            final_step = max(r.get("step", 0) for r in records)
            for metric in curves:
                steps, values = plot.series(records, metric)
                tail = values[steps > final_step - last]
                if len(tail):
                    per_seed.setdefault(metric, []).append(float(np.mean(tail)))
        cells = []
        for key in ["before", "after", "during", "rl_s", "purged"] + curves:
            values = per_seed.get(key, [])
            # Runs made before the RL-time clock existed have none: no partial mean.
            if not values or (key == "rl_s" and len(values) < len(workdirs)):
                cells.append("–")
            else:
                digits = 4 if "masked_frac" in key else 1 if key in ("rl_s", "purged") else 3
                cells.append(f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"
                             if len(values) > 1 else f"{values[0]:.{digits}f}")
        lines.append(f"| {label} | {len(workdirs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_studies(runs: list[dict], root: str, figures: str,
                 metrics: Sequence[str] = STUDY_METRICS, window: int = 1,
                 time_key: str = "time/elapsed_s", last: int = 10,
                 extra_table: Callable[[dict[str, list[str]]], str] | None = None) -> list[str]:
    """One figure set and table.md per study under <figures>/<study>/; returns the table.md
    paths."""
    summaries = []
    for study in dict.fromkeys(r["study"] for r in runs if r["study"] != "sft"):
        groups: dict[str, list[str]] = {}
        for r in runs:
            workdir = os.path.join(root, r["name"])
            if r["study"] == study and os.path.exists(os.path.join(workdir, DONE_MARKER)):
                groups.setdefault(r["label"], []).append(workdir)
        if groups:
            out_dir = os.path.join(figures, study)
            plot.plot_groups(groups, out_dir, metrics, window, time_key)
            summaries.append(os.path.join(out_dir, "table.md"))
            with open(summaries[-1], "w") as f:
                f.write(final_table(groups, last=last, metrics=metrics))
                if extra_table is not None:
                    f.write("\n" + extra_table(groups))
    return summaries


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True,
                        help="FILE:SIZE, e.g. experiments/icepop.py:local")
    parser.add_argument("--root", required=True, help="directory of the run workdirs")
    parser.add_argument("--figures", required=True, help="directory for the figures")
    parser.add_argument("--study", default="", help="one study (default: all)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds (default: all)")
    parser.add_argument("--arms", default="", help="comma-separated arm labels (default: all)")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window (points)")
    parser.add_argument("--plot_only", action="store_true", help="only draw the figures")
    args = parser.parse_args(argv)
    config_path, runs, report = load_sweep(args.config)
    runs = select(runs, args.study, [int(s) for s in args.seeds.split(",") if s],
                  [a for a in args.arms.split(",") if a])
    if not args.plot_only:
        t0 = time.perf_counter()
        run_all(config_path, runs, args.root)
        print(f"sweep: {time.perf_counter() - t0:.0f} s", flush=True)
    for summary in plot_studies(runs, args.root, args.figures, window=args.smooth, **report):
        print(f"{summary}:\n{open(summary).read()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
