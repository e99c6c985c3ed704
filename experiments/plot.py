"""Figures from one or several run workdirs' metrics.jsonl (curves and a final-value table).

    python experiments/plot.py --out=runs/figures runs/icepop_s0 runs/icepop_s1 runs/tis_s0
    python experiments/plot.py --out=figs IcePop=runs/a_s0 IcePop=runs/a_s1 TIS=runs/b_s0 \
        --metrics=eval/pass@1,rl/reward_mean,mismatch/abs_logp_diff_mean --smooth=5

Workdirs sharing a label are seeds of one setting: their curves are drawn as mean ± sample
std (ddof=1, across seeds) against the step, and against wall-clock (each seed interpolated onto
a common time grid up to the shortest run; ``--time_key=time/rl_s`` counts RL steps only, without
start-up and evaluation). A label is `LABEL=PATH` on the command line, else the workdir's name
with a trailing seed suffix (`_s0`, `-seed1`, `_seed=2`) removed.

Writes <out>/curves_vs_step.png, <out>/curves_vs_time.png and <out>/summary.md (last value of
each metric per label, mean ± sample std over seeds), and prints the table.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections import defaultdict
from typing import Sequence

import numpy as np

from ring_jax.train import metrics as metrics_lib

DEFAULT_PREFIXES = ("eval/", "rl/", "mismatch/", "train/", "sft/", "sched/", "perf/")
_SEED_SUFFIX = re.compile(r"[_-](s|seed)[=_-]?\d+$")


def read_metrics(workdir: str) -> list[dict]:
    """The records of workdir/metrics.jsonl (a torn last line is skipped)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics.jsonl in {workdir}")
    return metrics_lib.read_jsonl(path)


def default_label(workdir: str) -> str:
    """'runs/icepop_s3' -> 'icepop'; seeds of one setting share the label."""
    name = os.path.basename(os.path.normpath(workdir))
    return _SEED_SUFFIX.sub("", name) or name


def parse_runs(specs: Sequence[str]) -> dict[str, list[str]]:
    """['A=dir1', 'dir2_s0', 'dir2_s1'] -> {'A': ['dir1'], 'dir2': ['dir2_s0', 'dir2_s1']}."""
    groups: dict[str, list[str]] = defaultdict(list)
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or os.path.isdir(spec):
            label, path = default_label(spec), spec
        groups[label].append(path)
    return dict(groups)


def series(records: list[dict], metric: str, x_key: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one metric over the records that carry a finite value of it."""
    xs, ys = [], []
    for r in records:
        value = r.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
                value) and x_key in r:
            xs.append(float(r[x_key]))
            ys.append(float(value))
    return np.asarray(xs), np.asarray(ys)


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over `window` points (window 1: unchanged)."""
    if window <= 1 or len(y) == 0:
        return y
    cumsum = np.cumsum(np.insert(y, 0, 0.0))
    out = np.empty_like(y)
    for i in range(len(y)):
        lo = max(0, i + 1 - window)
        out[i] = (cumsum[i + 1] - cumsum[lo]) / (i + 1 - lo)
    return out


def _window(metric: str, window: int) -> int:
    """The smoothing window of `metric`: evaluations (``eval/``) are sparse, separate estimates
    on a fixed problem set, so they are drawn as measured; per-step training metrics smooth."""
    return 1 if metric.startswith("eval/") else window


def _sample_std(values, axis=None):
    """Sample std over seeds (ddof=1); 0 where there is one seed (no spread to draw)."""
    values = np.asarray(values, np.float64)
    n = values.shape[0] if axis == 0 else values.size
    return np.std(values, axis=axis, ddof=1) if n > 1 else np.zeros_like(
        values.mean(axis=axis))


def aggregate_by_step(runs: list[list[dict]], metric: str, window: int = 1):
    """Steps present in any seed -> (steps, mean, sample std, count) over the seeds that logged
    them."""
    per_step: dict[float, list[float]] = defaultdict(list)
    for records in runs:
        x, y = series(records, metric)
        for step, value in zip(x, smooth(y, _window(metric, window))):
            per_step[step].append(value)
    steps = np.asarray(sorted(per_step))
    values = [per_step[s] for s in steps]
    return (steps, np.asarray([np.mean(v) for v in values]),
            np.asarray([float(_sample_std(v)) for v in values]),
            np.asarray([len(v) for v in values]))


def aggregate_by_time(runs: list[list[dict]], metric: str, window: int = 1,
                      num_points: int = 200, time_key: str = "time/elapsed_s"):
    """Seeds interpolated onto a common wall-clock grid (to the shortest run) -> mean, sample
    std."""
    curves = [(x, smooth(y, _window(metric, window))) for x, y in
              (series(r, metric, x_key=time_key) for r in runs) if len(x)]
    if not curves:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    start = max(x[0] for x, _ in curves)
    end = min(x[-1] for x, _ in curves)
    if end <= start:
        grid = np.asarray([start])
    else:
        grid = np.linspace(start, end, num_points)
    stacked = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, stacked.mean(0), _sample_std(stacked, axis=0)


def pick_metrics(groups_records: dict[str, list[list[dict]]],
                 requested: Sequence[str] | None) -> list[str]:
    if requested:
        return list(requested)
    names = set()
    for runs in groups_records.values():
        for records in runs:
            for r in records:
                names.update(k for k, v in r.items() if k.startswith(DEFAULT_PREFIXES)
                             and isinstance(v, (int, float)) and not isinstance(v, bool))
    return sorted(names)


def summary_rows(groups_records: dict[str, list[list[dict]]], metrics: Sequence[str]):
    """[(label, num_seeds, {metric: (mean, sample std) of each seed's last value})]."""
    rows = []
    for label, runs in groups_records.items():
        finals = {}
        for metric in metrics:
            last = [series(r, metric)[1][-1] for r in runs if len(series(r, metric)[1])]
            if last:
                finals[metric] = (float(np.mean(last)), float(_sample_std(last)))
        rows.append((label, len(runs), finals))
    return rows


def summary_markdown(rows, metrics: Sequence[str]) -> str:
    header = "| run | seeds | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 2)]
    for label, num_seeds, finals in rows:
        cells = []
        for metric in metrics:
            if metric not in finals:
                cells.append("–")
                continue
            mean, std = finals[metric]
            cells.append(f"{mean:.4g} ± {std:.2g}" if num_seeds > 1 else f"{mean:.4g}")
        lines.append(f"| {label} | {num_seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _figure(num_panels: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(3, num_panels)
    rows = math.ceil(num_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel()[num_panels:]:
        ax.set_visible(False)
    return plt, fig, axes.ravel()


def plot_groups(groups: dict[str, list[str]], out_dir: str, metrics: Sequence[str] | None = None,
                window: int = 1, time_key: str = "time/elapsed_s") -> dict[str, str]:
    """Writes the two curve figures and summary.md; returns {'step'|'time'|'summary': path}.
    ``time_key``: the wall-clock axis, e.g. "time/rl_s" (RL steps only: no start-up, no
    evaluation)."""
    groups_records = {label: [read_metrics(w) for w in dirs] for label, dirs in groups.items()}
    metrics = pick_metrics(groups_records, metrics)
    if not metrics:
        raise ValueError("no metrics to plot (none given, none with a known prefix found)")
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    # Up to 10 labels: the default colour cycle; more: 20 distinct colours (tab20).
    colors = ({label: f"C{i}" for i, label in enumerate(groups_records)}
              if len(groups_records) <= 10 else None)
    for axis in ("step", "time"):
        plt, fig, axes = _figure(len(metrics))
        if colors is None:
            colors = {label: plt.get_cmap("tab20")(i % 20)
                      for i, label in enumerate(groups_records)}
        for ax, metric in zip(axes, metrics):
            for label, runs in groups_records.items():
                if axis == "step":
                    x, mean, std, _ = aggregate_by_step(runs, metric, window)
                else:
                    x, mean, std = aggregate_by_time(runs, metric, window, time_key=time_key)
                    x = x / 60.0
                if len(x) == 0:
                    continue
                seeds = f" (n={len(runs)})" if len(runs) > 1 else ""
                line, = ax.plot(x, mean, label=label + seeds, color=colors[label],
                                marker="." if len(x) < 30 else None)
                if len(runs) > 1:
                    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            ax.set_title(metric, fontsize=10)
            ax.set_xlabel("step" if axis == "step" else f"{time_key} (min)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        paths[axis] = os.path.join(out_dir, f"curves_vs_{axis}.png")
        fig.savefig(paths[axis], dpi=110)
        plt.close(fig)
    table = summary_markdown(summary_rows(groups_records, metrics), metrics)
    paths["summary"] = os.path.join(out_dir, "summary.md")
    with open(paths["summary"], "w") as f:
        f.write(table)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="workdirs, or LABEL=WORKDIR")
    parser.add_argument("--out", required=True, help="directory for the PNGs and summary.md")
    parser.add_argument("--metrics", default="",
                        help="comma-separated metric names (default: all with a known prefix)")
    parser.add_argument("--smooth", type=int, default=1,
                        help="moving-average window (points) of per-step metrics; eval/ "
                        "metrics are never smoothed")
    parser.add_argument("--time_key", default="time/elapsed_s",
                        help="wall-clock axis: time/elapsed_s (whole run) or time/rl_s (RL steps)")
    args = parser.parse_args(argv)
    metrics = [m for m in args.metrics.split(",") if m] or None
    paths = plot_groups(parse_runs(args.runs), args.out, metrics, args.smooth, args.time_key)
    print(open(paths["summary"]).read(), end="")
    print(f"wrote {paths['step']}, {paths['time']}, {paths['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
