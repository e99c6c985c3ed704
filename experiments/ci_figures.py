"""Study curves with bootstrap confidence bands, and paired differences against a baseline arm.

`plot_ci(groups, out_dir, metrics, baseline)` writes two figures into ``out_dir``:

  * ``curves_ci_vs_step.png``: every arm's mean over seeds at each step, with a percentile-
    bootstrap 95% band of that mean (the seeds resampled with replacement, as
    `stats.bootstrap_ci` does for the tables), so the baseline (e.g. a no-mismatch control) is
    drawn with the same kind of band as the arms it is compared with;
  * ``paired_vs_<baseline>.png``: per seed, arm − baseline at each step both logged, the mean of
    those differences with its bootstrap 95% band and a line at 0: where the band clears 0, the
    seeds support a difference at that step (pointwise, not corrected for the many steps).

``groups`` is {label: [workdir, ...]} with workdirs named ``<arm>_s<seed>`` (seeds pair arms).
Training metrics are smoothed per seed by a moving average of ``window`` steps before seeds are
combined; evaluations are drawn as measured (`plot._window`). A step enters an arm's curve only
where every seed of the arm logged it.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

import plot  # experiments/plot.py (sweep.py puts experiments/ on sys.path)
import stats  # experiments/stats.py

FIGURE_RESAMPLES = 2000  # per step; the tables' CIs use stats.BOOTSTRAP_RESAMPLES


def _seed(workdir: str) -> int:
    return int(os.path.basename(os.path.normpath(workdir)).rsplit("_s", 1)[1])


def seed_curves(workdirs: Sequence[str], metric: str, window: int = 1
                ) -> dict[int, dict[float, float]]:
    """{seed: {step: value}} of ``metric`` for one arm's runs (smoothed as the module says)."""
    out = {}
    for workdir in workdirs:
        steps, values = plot.series(plot.read_metrics(workdir), metric)
        values = plot.smooth(values, plot._window(metric, window))
        out[_seed(workdir)] = dict(zip(steps.tolist(), values.tolist()))
    return out


def bootstrap_band(values_XN: np.ndarray, confidence: float = stats.CONFIDENCE,
                   num_resamples: int = FIGURE_RESAMPLES, seed: int = stats.BOOTSTRAP_SEED
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows x = steps, columns n = seeds -> (mean, low, high) per row: the percentile-bootstrap
    CI of the mean over seeds, one resampling of the seeds shared by every row."""
    values_XN = np.asarray(values_XN, np.float64)
    num_seeds = values_XN.shape[1]
    picks_RN = np.random.default_rng(seed).integers(0, num_seeds, (num_resamples, num_seeds))
    means_XR = values_XN[:, picks_RN].mean(-1)
    tail = (1.0 - confidence) / 2.0
    return (values_XN.mean(1), np.quantile(means_XR, tail, axis=1),
            np.quantile(means_XR, 1.0 - tail, axis=1))


def _stack(curves: dict[int, dict[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(steps every seed logged, values [steps, seeds])."""
    seeds = sorted(curves)
    steps = sorted(set.intersection(*(set(curves[s]) for s in seeds))) if seeds else []
    return np.asarray(steps), np.asarray([[curves[s][x] for s in seeds] for x in steps])


def plot_ci(groups: dict[str, list[str]], out_dir: str, metrics: Sequence[str],
            baseline: str | None = None, window: int = 10) -> dict[str, str]:
    """Writes the two figures of the module docstring; returns {'curves'|'paired': path}.
    ``baseline`` defaults to the first arm."""
    baseline = baseline if baseline in groups else next(iter(groups))
    curves = {label: {m: seed_curves(w, m, window) for m in metrics}
              for label, w in groups.items()}
    colors = {label: f"C{i % 10}" for i, label in enumerate(groups)}
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for kind in ("curves", "paired"):
        plt, fig, axes = plot._figure(len(metrics))
        for ax, metric in zip(axes, metrics):
            base = curves[baseline][metric]
            for label in groups:
                arm = curves[label][metric]
                if kind == "curves":
                    x, values = _stack(arm)
                else:
                    if label == baseline:
                        continue
                    x, values = _paired(arm, base)
                if not len(x):
                    continue
                mean, low, high = bootstrap_band(values)
                ax.plot(x, mean, color=colors[label], label=f"{label} (n={values.shape[1]})",
                        marker="." if len(x) < 30 else None)
                ax.fill_between(x, low, high, color=colors[label], alpha=0.2)
            if kind == "paired":
                ax.axhline(0.0, color="k", lw=0.8)
            title = metric if kind == "curves" else f"{metric}: arm − {baseline}"
            smoothed = "" if metric.startswith("eval/") or window <= 1 else f", MA {window}"
            ax.set_title(title + smoothed, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        if axes[0].get_legend_handles_labels()[0]:  # the paired figure of one arm has none
            axes[0].legend(fontsize=7)
        fig.suptitle(f"mean over seeds, bootstrap {stats.CONFIDENCE:.0%} band "
                     f"({FIGURE_RESAMPLES} resamples of the seeds)", fontsize=9)
        fig.tight_layout()
        name = "curves_ci_vs_step.png" if kind == "curves" else f"paired_vs_{baseline}.png"
        paths[kind] = os.path.join(out_dir, name)
        fig.savefig(paths[kind], dpi=110)
        plt.close(fig)
    return paths


def _paired(arm: dict[int, dict[float, float]], base: dict[int, dict[float, float]]
            ) -> tuple[np.ndarray, np.ndarray]:
    """(steps logged by both arms in every shared seed, arm − base [steps, seeds])."""
    seeds = sorted(set(arm) & set(base))
    if not seeds:
        return np.zeros(0), np.zeros((0, 0))
    steps = sorted(set.intersection(*(set(arm[s]) & set(base[s]) for s in seeds)))
    return np.asarray(steps), np.asarray([[arm[s][x] - base[s][x] for s in seeds]
                                          for x in steps])
