"""Reruns every study of experiments/REPRODUCING.md (issue 7) with one command.

    python experiments/reproduce.py --size=local --root=runs/reproduce --figures=experiments/figures
    python experiments/reproduce.py --size=smoke --root=/tmp/rj_smoke --figures=/tmp/rj_smoke/fig

``--size=local`` is the size REPRODUCING.md reports (hours on a 2-core CPU, resumable: finished
runs are skipped, so rerunning the command continues where it stopped):

  0. the README quickstart into <root>/quickstart (study 1's "after RL vs at start" policy);
  1. mismatch anatomy  experiments/mismatch_anatomy.py --size=local  -> <figures>/mismatch_anatomy
  2-3. stability, sensitivity and the mismatch calibration
                       experiments/sweep.py --config=experiments/icepop.py:local
                                                                      -> <figures>/stability/<study>
  2b. stability with power (issue 13): control/none/TIS/IcePop/KPop, 5 seeds x 300 steps
                       experiments/sweep.py --config=experiments/stability.py:local
                                                                 -> <figures>/stability_v2/<study>
  4. C3PO++ reward parity (issue 14): sync vs paced C3PO++, held-out pass@1, TOST at ±0.05
                       experiments/sweep.py --config=experiments/c3po.py:parity
                                                               -> <figures>/c3po_parity/parity
  4b. the same between policies that learn (training-matched held-out set, piloted recipe)
                       experiments/sweep.py --config=experiments/c3po.py:parity_v2
                                                         -> <figures>/c3po_parity_v2/parity_v2

(Study 4's first sweeps, ``c3po.py:local`` (issue 7: sync/async/C3PO++ and the Φ, σ_max
sweeps), are withdrawn and not chained; the config still defines them.)

``--size=smoke`` runs the same pipeline in minutes for the slow test set: study 1 at its tiny
size (without the quickstart part), and for studies 2-4 (and 2b) one seed of a few arms at the
configs' ``smoke`` size (which learn nothing; study 4 as 4b's ``parity_v2,smoke``). Each
stage is its own process; a failing stage stops the rest, with its log under <root>/logs/.
Timings per stage go to <root>/reproduce_timings.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))


def stages(size: str, root: str, figures: str, python: str = sys.executable
           ) -> list[tuple[str, list[str]]]:
    """(name, command) of each stage, in order."""
    sweep = [python, os.path.join(HERE, "sweep.py")]
    if size == "local":
        quickstart = os.path.join(root, "quickstart")
        return [
            ("quickstart", [python, "-m", "ring_jax.main",
                            f"--config={os.path.join(HERE, 'quickstart.py')}",
                            f"--workdir={quickstart}"]),
            ("mismatch_anatomy", [python, os.path.join(HERE, "mismatch_anatomy.py"),
                                  "--size=local", f"--trained_workdir={quickstart}",
                                  f"--out_dir={os.path.join(figures, 'mismatch_anatomy')}",
                                  f"--work_dir={os.path.join(root, 'mismatch_anatomy')}"]),
            ("icepop", sweep + [f"--config={os.path.join(HERE, 'icepop.py')}:local",
                                f"--root={os.path.join(root, 'icepop')}",
                                f"--figures={os.path.join(figures, 'stability')}"]),
            ("stability", sweep + [f"--config={os.path.join(HERE, 'stability.py')}:local",
                                   f"--root={os.path.join(root, 'stability')}",
                                   f"--figures={os.path.join(figures, 'stability_v2')}"]),
        ] + [(f"c3po_{study}", sweep + [f"--config={os.path.join(HERE, 'c3po.py')}:{study}",
                                         f"--root={os.path.join(root, f'c3po_{study}')}",
                                         f"--figures={os.path.join(figures, f'c3po_{study}')}"])
             for study in ("parity", "parity_v2")]
    return [
        ("mismatch_anatomy", [python, os.path.join(HERE, "mismatch_anatomy.py"), "--size=tiny",
                              "--trained_workdir=",
                              f"--out_dir={os.path.join(figures, 'mismatch_anatomy')}",
                              f"--work_dir={os.path.join(root, 'mismatch_anatomy')}"]),
        ("icepop", sweep + [f"--config={os.path.join(HERE, 'icepop.py')}:smoke", "--seeds=0",
                            "--arms=none,icepop,icepop_masked_removed",
                            f"--root={os.path.join(root, 'icepop')}",
                            f"--figures={os.path.join(figures, 'stability')}"]),
        ("stability", sweep + [f"--config={os.path.join(HERE, 'stability.py')}:smoke",
                               "--seeds=0", "--arms=control,none",
                               f"--root={os.path.join(root, 'stability')}",
                               f"--figures={os.path.join(figures, 'stability_v2')}"]),
        ("c3po_parity_v2", sweep + [f"--config={os.path.join(HERE, 'c3po.py')}:parity_v2,smoke",
                                    "--seeds=0", f"--root={os.path.join(root, 'c3po_parity_v2')}",
                                    f"--figures={os.path.join(figures, 'c3po_parity_v2')}"]),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("local", "smoke"), default="local")
    parser.add_argument("--root", required=True, help="directory of every run's workdir")
    parser.add_argument("--figures", required=True, help="directory for figures and tables")
    parser.add_argument("--only", default="", help="comma-separated stage names to run")
    args = parser.parse_args(argv)
    os.makedirs(os.path.join(args.root, "logs"), exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))}
    only = {s for s in args.only.split(",") if s}
    timings_path = os.path.join(args.root, "reproduce_timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
    for name, cmd in stages(args.size, args.root, args.figures):
        if only and name not in only:
            continue
        marker = os.path.join(args.root, "logs", f"{name}.done")  # the sweeps skip on their own
        if name == "quickstart" and os.path.exists(marker):
            print(f"{name}: done, skipped", flush=True)
            continue
        log = os.path.join(args.root, "logs", f"{name}.log")
        print(f"{name}: {' '.join(cmd[1:])}  (log: {log})", flush=True)
        t0 = time.perf_counter()
        with open(log, "a") as f:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        if rc:
            raise SystemExit(f"{name} failed (exit {rc}); see {log}")
        timings[name] = round(time.perf_counter() - t0, 1)
        if name == "quickstart":
            open(marker, "w").close()
        print(f"    {timings[name]:.0f} s", flush=True)
        with open(timings_path, "w") as f:
            json.dump(timings, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
