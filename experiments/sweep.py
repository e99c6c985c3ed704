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
label per arm, its seeds as mean ± sample std) into ``<figures>/<study>/`` (curves_vs_step.png,
curves_vs_time.png, summary.md) and writes ``table.md`` there (`experiments/stats.py`):

  * per arm: held-out pass@1 before RL, at the final evaluation and averaged over the last
    ``LAST_EVALS`` evaluations, and each curve's mean over the last ``TABLE_LAST`` steps, as
    mean ± sample std (ddof=1) over seeds;
  * paired differences against the study's baseline arm (``--baseline``, else the config's
    ``BASELINE`` (a label, or {study: label}), else the first arm): per seed arm − baseline,
    mean with a bootstrap 95% CI and a sign test; "n.s." where the CI spans 0;
  * the config's pre-declared readouts (``READOUTS = {name: fn(records)}``, e.g.
    `stats.collapse_readout`), per seed and paired against the baseline.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
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
import stats  # noqa: E402  (experiments/stats.py)

DONE_MARKER = "SWEEP_DONE"
# The curves of issue 7's study 2 (metric names from ring_jax.rl.losses.finalize_metrics).
STUDY_METRICS = ("rl/reward_mean", "eval/pass@1", "train/grad_norm",
                 "mismatch/abs_logp_diff_max", "mismatch/abs_logp_diff_mean",
                 "mismatch/masked_frac_above", "mismatch/masked_frac_below",
                 "rl/entropy_all_tokens", "rl/entropy_masked_tokens", "moe/dropped_frac")
LAST_EVALS = 4  # evaluations averaged per seed besides the final one
# Metric-name prefixes a committed extract keeps (besides the config's STUDY_METRICS and
# EXTRACT_KEYS): what final_table, plot_groups and the stats readouts read.
EXTRACT_PREFIXES = ("step", "eval/", "time/", "sched/total/", "train/grad_norm", "mismatch/",
                    "rl/reward", "rl/entropy", "moe/dropped_frac")


def load_sweep(config: str) -> tuple[str, list[dict], dict]:
    """'FILE:SIZE' -> (FILE, FILE's get_sweep(SIZE), how to report it). FILE may set
    ``STUDY_METRICS`` (the curves drawn and tabulated), ``TIME_KEY`` (the wall-clock axis),
    ``TABLE_LAST`` (steps averaged per seed in table.md), ``LAST_EVALS`` (evaluations averaged
    per seed), ``BASELINE`` (the arm label the others are paired against, or {study: label}),
    ``READOUTS`` ({name: fn(records) -> float | None}, declared before the runs),
    ``extra_table(groups) -> str`` (markdown appended to table.md) and
    ``extra_figures(groups, out_dir, baseline)`` (more figures per study); defaults: study 2's."""
    path, _, size = config.partition(":")
    spec = importlib.util.spec_from_file_location("_sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = dict(metrics=getattr(module, "STUDY_METRICS", STUDY_METRICS),
                  time_key=getattr(module, "TIME_KEY", "time/elapsed_s"),
                  last=getattr(module, "TABLE_LAST", 10),
                  last_evals=getattr(module, "LAST_EVALS", LAST_EVALS),
                  baseline=getattr(module, "BASELINE", None),
                  readouts=getattr(module, "READOUTS", {}),
                  extra_table=getattr(module, "extra_table", None),
                  extra_figures=getattr(module, "extra_figures", None))
    report["extract_keys"] = tuple(report["metrics"]) + tuple(getattr(module, "EXTRACT_KEYS", ()))
    # A config may narrow what its extracts keep (its tables read only some of it).
    report["extract_prefixes"] = tuple(getattr(module, "EXTRACT_PREFIXES", EXTRACT_PREFIXES))
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


def seed_of(workdir: str) -> int:
    """The seed of a run from its name (``<arm>_s<seed>``), which pairs arms."""
    return int(os.path.basename(os.path.normpath(workdir)).rsplit("_s", 1)[1])


def per_seed_values(workdirs: Sequence[str], last: int = 10, last_evals: int = LAST_EVALS,
                    metrics: Sequence[str] = STUDY_METRICS,
                    readouts: dict[str, stats.Readout] | None = None
                    ) -> dict[str, dict[int, float]]:
    """{column: {seed: value}} of one arm's runs: pass@1 before RL, final, mean of the last
    ``last_evals`` evaluations and of every evaluation after step 0, RL seconds, purged %, each
    other metric's mean over the last ``last`` steps, and each readout (None -> nan)."""
    out: dict[str, dict[int, float]] = {}
    curves = [m for m in metrics if m != "eval/pass@1"]
    for workdir in workdirs:
        seed = seed_of(workdir)
        put = lambda key, value, seed=seed: out.setdefault(key, {}).__setitem__(seed, value)
        records = plot.read_metrics(workdir)
        _, evals = plot.series(records, "eval/pass@1")
        if len(evals):
            put("before", float(evals[0]))
            put("after", float(evals[-1]))
            put("last_evals", stats.last_evaluations_mean(evals, last_evals))
            if len(evals) > 1:  # every evaluation after step 0: less noisy than the last
                put("during", float(np.mean(evals[1:])))
        _, rl_seconds = plot.series(records, "time/rl_s")
        if len(rl_seconds):
            put("rl_s", float(rl_seconds[-1]))
        totals = next((r for r in reversed(records) if "sched/total/trained_responses" in r),
                      None)
        if totals is not None:  # responses purged (C3PO++ staleness) / responses finished
            purged = totals.get("sched/total/purged_responses", 0.0)
            put("purged", 100.0 * purged / max(purged + totals["sched/total/trained_responses"],
                                               1.0))
        final_step = max(r.get("step", 0) for r in records)
        for metric in curves:
            steps, values = plot.series(records, metric)
            tail = values[steps > final_step - last]
            if len(tail):
                put(metric, float(np.mean(tail)))
        for name, readout in (readouts or {}).items():
            value = readout(records)
            put(name, float("nan") if value is None else float(value))
    return out


def _digits(key: str) -> int:
    return 4 if "masked_frac" in key or "dropped_frac" in key else 1 if key in (
        "rl_s", "purged") else 3


def _significant(value, digits: int = 7):
    return float(f"{value:.{digits}g}") if isinstance(value, float) else value


def extract_runs(runs: list[dict], root: str, out: str, keys: Sequence[str] = (),
                 prefixes: Sequence[str] = EXTRACT_PREFIXES) -> list[str]:
    """Copies each finished run of ``runs`` from ``root`` to ``out/<name>/`` compactly: its
    config.json and DONE marker as they are, its metrics.jsonl restricted to the keys starting
    with one of ``prefixes`` (default `EXTRACT_PREFIXES`) or listed in ``keys``, floats rounded to 7 significant digits
    (tables print 3-4). Returns the run names written."""
    written = []
    for run in runs:
        src, dst = os.path.join(root, run["name"]), os.path.join(out, run["name"])
        if not os.path.exists(os.path.join(src, DONE_MARKER)):
            continue
        os.makedirs(dst, exist_ok=True)
        for name in ("config.json", DONE_MARKER):
            if os.path.exists(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
        with open(os.path.join(dst, "metrics.jsonl"), "w") as f:
            for record in plot.read_metrics(src):
                kept = {k: _significant(v) for k, v in record.items()
                        if k.startswith(tuple(prefixes)) or k in keys}
                if len(kept) > 1:  # more than the step
                    f.write(json.dumps(kept, separators=(",", ":")) + "\n")
        written.append(run["name"])
    return written


def final_table(groups: dict[str, list[str]], last: int = 10,
                metrics: Sequence[str] = STUDY_METRICS, last_evals: int = LAST_EVALS,
                baseline: str | None = None,
                readouts: dict[str, stats.Readout] | None = None) -> str:
    """Markdown: per arm, mean ± sample std over seeds of eval/pass@1 (before RL, final, mean of
    the last ``last_evals`` evaluations, mean of the evaluations after step 0), the seconds
    spent in RL steps (``time/rl_s``), the % of finished responses purged for staleness, each
    other metric averaged over each seed's last ``last`` steps, and each readout; then the
    paired differences of every arm against ``baseline`` (default: the first arm). A metric a
    run never logged is "–"."""
    readouts = readouts or {}
    curves = [m for m in metrics if m != "eval/pass@1"]
    values = {label: per_seed_values(w, last, last_evals, metrics, readouts)
              for label, w in groups.items()}
    baseline = baseline if baseline in groups else next(iter(groups))
    lines = [f"Cells: mean ± sample std (ddof=1) over seeds. Paired: arm − {baseline} per seed, "
             f"mean [bootstrap {stats.CONFIDENCE:.0%} CI, {stats.BOOTSTRAP_RESAMPLES} resamples, "
             f"seed {stats.BOOTSTRAP_SEED}] (seeds +/−, two-sided sign-test p); n.s.: the CI "
             "spans 0.", ""]
    columns = {"before": "pass@1 before RL", "after": "pass@1 final",
               "last_evals": f"pass@1 last {last_evals} evals",
               "during": "pass@1 mean of RL evals", "rl_s": "RL s", "purged": "purged %",
               **{m: f"{m} (last {last})" for m in curves}, **{r: r for r in readouts}}
    lines += ["| arm | seeds | " + " | ".join(columns.values()) + " |",
              "|" + "---|" * (len(columns) + 2)]
    for label, workdirs in groups.items():
        cells = []
        for key in columns:
            per_seed = values[label].get(key, {})
            finite = [v for v in per_seed.values() if np.isfinite(v)]
            if key in readouts:  # a readout may be undefined for some seeds (e.g. no collapse)
                cells.append(f"{stats.mean_std_cell(finite, 1)} ({len(finite)}/{len(per_seed)})"
                             if per_seed else "–")
            # Runs made before the RL-time clock existed have none: no partial mean.
            elif not per_seed or (key == "rl_s" and len(per_seed) < len(workdirs)):
                cells.append("–")
            else:
                cells.append(stats.mean_std_cell(finite, _digits(key)))
        lines.append(f"| {label} | {len(workdirs)} | " + " | ".join(cells) + " |")
    if readouts:
        lines += ["", "Readouts (declared before the runs; cells: mean ± std over the seeds where "
                  "defined (defined/seeds)):"] + [
            f"- {name}: {getattr(fn, 'description', fn.__doc__ or '')}"
            for name, fn in readouts.items()]
    paired_keys = ["after", "last_evals"] + [m for m in curves if m.startswith(
        ("rl/reward", "mismatch/abs_logp"))] + list(readouts)
    lines += ["", f"Paired differences against {baseline}:", "",
              "| arm | " + " | ".join(f"Δ {columns[k]}" for k in paired_keys) + " |",
              "|" + "---|" * (len(paired_keys) + 1)]
    for label in groups:
        if label == baseline:
            continue
        cells = [stats.format_paired(stats.paired(values[label].get(k, {}),
                                                  values[baseline].get(k, {})), _digits(k))
                 for k in paired_keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_studies(runs: list[dict], root: str, figures: str,
                 metrics: Sequence[str] = STUDY_METRICS, window: int = 1,
                 time_key: str = "time/elapsed_s", last: int = 10,
                 extra_table: Callable[[dict[str, list[str]]], str] | None = None,
                 last_evals: int = LAST_EVALS, baseline: str | dict | None = None,
                 readouts: dict[str, stats.Readout] | None = None,
                 extra_figures: Callable[[dict[str, list[str]], str, str | None], object]
                 | None = None) -> list[str]:
    """One figure set and table.md per study under <figures>/<study>/; returns the table.md
    paths. ``baseline``: the arm label every other arm is paired against, or {study: label}."""
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
            study_baseline = baseline.get(study) if isinstance(baseline, dict) else baseline
            if extra_figures is not None:
                extra_figures(groups, out_dir, study_baseline)
            summaries.append(os.path.join(out_dir, "table.md"))
            with open(summaries[-1], "w") as f:
                f.write(final_table(groups, last=last, metrics=metrics, last_evals=last_evals,
                                    baseline=study_baseline, readouts=readouts))
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
    parser.add_argument("--extract", default="",
                        help="write compact, committable copies of the finished runs here")
    parser.add_argument("--baseline", default="",
                        help="arm label the others are paired against (default: the config's "
                             "BASELINE, else the first arm)")
    args = parser.parse_args(argv)
    config_path, runs, report = load_sweep(args.config)
    if args.baseline:
        report["baseline"] = args.baseline
    runs = select(runs, args.study, [int(s) for s in args.seeds.split(",") if s],
                  [a for a in args.arms.split(",") if a])
    if not args.plot_only:
        t0 = time.perf_counter()
        run_all(config_path, runs, args.root)
        print(f"sweep: {time.perf_counter() - t0:.0f} s", flush=True)
    extract_keys, extract_prefixes = report.pop("extract_keys"), report.pop("extract_prefixes")
    if args.extract:
        names = extract_runs(runs, args.root, args.extract, extract_keys, extract_prefixes)
        print(f"extracted {len(names)} runs into {args.extract}", flush=True)
    for summary in plot_studies(runs, args.root, args.figures, window=args.smooth, **report):
        print(f"{summary}:\n{open(summary).read()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
