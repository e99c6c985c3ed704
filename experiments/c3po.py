"""Study 4 of issue 7: C3PO++ vs synchronous vs k-step async rollouts in real RL runs (PAPER §2).

The paper reports C3PO++ (a token budget Φ per rollout iteration, unfinished responses carried
to the next policy version, purged past σ_max versions) ~2.5× faster in the rollout phase and
~1.5× end to end than synchronous rollouts, with reward on par. This study trains the same
policy with each scheduler and records reward vs step and vs wall-clock, held-out accuracy, the
rollout-phase and end-to-end seconds per step and per trained token, purges and staleness.
(`experiments/benchmarks/c3po.py` measures the scheduler alone on simulated accelerator time;
this is the whole RL loop on the real engine and trainer.)

Recipe: the quickstart's tiny Ling-2.0 MoE and GRPO + IcePop with a bf16 engine, on a
**long-tailed difficulty mix**: addition of two 1-12 digit numbers with worked column sums, the
operand size drawn with P(size) ∝ size^-1.5 (`Task.size_tail`), so responses are ~22 tokens at
the median, ~63 at p90 and up to ~121 (the long tail C3PO++'s budget targets). SFT warm start
(one per seed, shared by all arms of that seed through ``init_from``), then RL where the arms
differ only in ``scheduler``:

  sync            every batch's responses run to completion (the baseline)
  async           k = 1 step off-policy: batch n is generated with the weights of step n-1 in a
                  background thread while the trainer trains batch n-1
  c3po            C3PO++ with Φ = 1024 new tokens per iteration (≈ one batch: 32 responses ×
                  ~30 tokens) and σ_max = 4 policy versions (enough for a 121-token response at
                  ~32 tokens per iteration)
  c3po_phi{512,2048}      the budget sweep at σ_max = 4
  c3po_sigma{1,2}         the staleness sweep at Φ = 1024
  paced, paced_sigma1     C3PO++'s budget and carry-over with paced admission instead of purging
                          (`scheduler.mode="paced"`): nothing purged, every trained token within
                          σ_max; compare trained response lengths with sync's (length bias)

Parity study (issue 14 item 5; design and readouts declared before its runs)
---------------------------------------------------------------------------
Question: does C3PO++ with paced admission reach the held-out accuracy of synchronous rollouts?
An equivalence test, not "no significant difference".

* **Arms** (`PARITY_ARMS`): ``sync`` (the baseline) and ``paced`` (Φ = 1024, σ_max = 4, paced
  admission: nothing purged). Everything else as above (SFT 400 steps, 60 RL steps, engine
  warm-up on, the long-tailed 1-12 digit addition mix).
* **Seeds**: `PARITY_SEEDS` (0-4), paired by seed: arms of seed s share the SFT warm start
  ``sft_s<s>``, the data order and the sampling streams, and run back to back. Seeds 0 and 1
  run first as the pilot; their runtime (not their outcome) decides whether all 5 seeds fit
  the session, else the study stops at 3.
* **Evaluation**: greedy pass@1 through a float32 engine (a function of the policy alone) on
  `PARITY_EVAL_PROMPTS` = 1024 fixed held-out problems (`ring_jax.train.evaluate.eval_records`:
  the task's held-out split, disjoint from every SFT/RL draw by construction (`in_eval_split`),
  drawn with a constant seed, identical across seeds and arms), at RL steps 0, 20, 40, 60.
  1024 problems: one evaluation's binomial standard error is ≤ 0.016, and the primary outcome
  averages 2 of them, so the evaluation adds ≤ ~0.01 to a seed's paired difference, well under
  the margin; the spread between seeds (training noise) is what the seeds measure.
  (Declared first as every 10 steps with the last 4 averaged; changed to this before any run
  had evaluated anything, when the pilot's start-up showed the shared CPU at load ~15 could
  not afford 7 evaluations of 2 × 1024 responses per run.)
* **Primary outcome**: pass@1, mean of the last 2 evaluations (steps 40 and 60), per seed.
* **Verdict** (`stats.tost`, margin `PARITY_MARGIN` = ±0.05): the paired differences
  d_s = paced_s − sync_s; two one-sided t-tests (df = seeds − 1) at α = 0.05, i.e. the 90% t
  confidence interval of mean d. CI inside (−0.05, +0.05) → "equivalent within ±0.05"; CI
  entirely outside it → "not equivalent"; otherwise "inconclusive".
* **Readouts** (`READOUTS`, per run, paired against sync): the trained responses' length (mean
  over the run of the per-step mean and p90 of ``sched/trained_response_len``: length bias),
  the purged % (must be 0 for paced), RL seconds (``time/rl_s``, the x axis of the curves), and
  the RL gain (pass@1 last 2 evals − before RL), which says whether 60 steps moved the policy
  enough for parity to mean something.

Study 4b: parity between policies that learn (issue 14; declared before its runs)
-------------------------------------------------------------------------------
Why: study 4 ("parity", above) found paced C3PO++ equivalent to sync within ±0.05, but on a
held-out pass@1 of ~0.04 that RL *lowered* in both arms. Its evaluation set was all distinct
held-out problems of the 1-12 digit mix: the one-digit problem space (100 problems, 10 held out)
cannot follow a mix that draws 49% one-digit problems, so the set was mostly 2-12 digit sums
while the training reward came mostly from one-digit ones. Study 4b (config ``parity_v2``,
sweep study ``parity_v2``, `PARITY_V2`) fixes the evaluation's difficulty and the recipe, and
asks the same question.

* **Task**: addition with worked column sums, operand size 2-10 digits, P(size) ∝
  (size − 1)^-1.5 (`draw_size`): 51% two-digit, 18% three-digit, ..., 1.9% ten-digit, so the
  responses keep a long tail (worked solutions ~24 tokens for two digits, ~91 for ten). Sizes
  start at 2 because one digit leaves no room to hold out: every size ≥ 2 has ≥ 8,100 problems.
* **Held-out split** (``task.kwargs.eval_fraction = 0.25``, hash-chosen, disjoint from every
  SFT/RL draw by construction): the 1024 distinct evaluation problems then keep the training
  mix: measured 48.9% / 17.1% two/three-digit vs 50.9% / 18.0% in training, every other size
  within 1.2 points (with the default 0.1 the two-digit share falls to 42.4%: 810 held-out
  two-digit problems run out of distinct ones). One evaluation set for every seed and arm.
* **Recipe**: as study 4 (tiny Ling-2.0 MoE, GRPO + IcePop, bf16 engine, batch 32 = 4 groups
  of 8, engine bucket warm-up on, 60 RL steps) but **one SFT warm start of
  ``PARITY_V2["sft_steps"]`` = 1000 steps** (`PARITY_V2_SFT`, seed 0) shared by every seed and
  arm, and RL at learning rate ``PARITY_V2["learning_rate"]`` (study 4: 2e-4).
  **Pilot 1** (seed `PARITY_V2_PILOT_SEED` = 100, not a study seed, sync only; its runs are not
  part of the study): SFT 400 steps (study 4's length) reached held-out pass@1 0.139 (sampled
  T = 1 accuracy 0.048), and sync RL then had little reward to learn from (training reward
  0.03-0.09 per step): pass@1 at steps 20/40/60 was 0.130/0.196/0.131 at lr 1e-4 (gain +0.025,
  unsteady) and 0.084/0.041/0.025 at 2e-4 (study 4's rate; gain −0.11, a collapse). Hence the
  longer SFT (its loss was still falling at step 400) and no 2e-4. One shared warm start
  because 5 SFTs of 1000 steps do not fit the session on this CPU; the seeds then vary the RL
  streams (prompt order, sampling), so the verdict is about RL noise from this start, not
  about SFT-to-SFT spread (a qualification, stated).
  **Pilot 2** (RL seed 100 from the study's shared warm start; it sees that start's pass@1,
  which every arm shares, and no study run's RL): sync RL 60 steps at 1e-4 and at 5e-5; the
  rate is chosen whose RL gain (pass@1 steps 40/60 − before RL) is positive, the larger gain
  if both are; if neither is, 1e-4 is kept and the write-up says the study again compares
  policies that do not learn. **Pilot 2 result**: the shared warm start's held-out pass@1 is
  0.662 (sampled T = 1 accuracy 0.61); sync RL raised it to 0.738/0.758/0.772 at steps
  20/40/60 at lr 1e-4 (gain +0.103) and to 0.736/0.752/0.766 at 5e-5 (gain +0.097).
  **Chosen: 1e-4** (the larger gain).
* **Arms** (`PARITY_ARMS`): sync (the baseline) and paced (Φ = 1024, σ_max = 4), as study 4.
* **Seeds**: `PARITY_V2_SEEDS` (0-4) for RL, both arms of a seed sharing the data order and
  sampling streams, paired by seed; all from the one warm start. All five are launched; seeds
  0-2 at a higher CPU priority than 3-4, and the verdict uses every seed whose two arms have
  finished by the session's cut-off (00:20 UTC 2026-12-03), at least 3; a seed is left out only
  for being unfinished, never for its outcome, and the write-up names any left out.
* **Evaluation, primary outcome, verdict**: as study 4: greedy fp32 pass@1 on the 1024
  held-out problems at RL steps 0, 20, 40, 60; primary outcome the mean of steps 40 and 60;
  `stats.tost` of the paired differences paced − sync at margin ±`PARITY_MARGIN` (0.05; at the
  expected pass@1 of ~0.2-0.5 a 5-point difference is a tenth to a quarter of the level, the
  size a reviewer would call a real loss; declared before the runs, not tightened after).
* **Readouts**: as study 4 (trained length mean/p90, purged %, RL seconds, RL gain). The RL
  gain of the sync arm is the study's validity check: if it is not positive (mean over seeds,
  bootstrap CI excluding 0), the write-up says that the parity tested is again between
  policies that do not learn, whatever the verdict.

Commands (resumable; figures and table.md into <figures>/<study>/; ``parity_v2`` as
``parity``, with its own root, figures and extract directories ``c3po_parity_v2``):

    python experiments/sweep.py --config=experiments/c3po.py:local \
        --root=runs/c3po --figures=experiments/figures/c3po
    python experiments/sweep.py --config=experiments/c3po.py:local --study=modes --seeds=0 ...
    python experiments/sweep.py --config=experiments/c3po.py:parity --root=runs/c3po_parity \
        --figures=experiments/figures/c3po_parity --extract=experiments/results/c3po_parity
    python experiments/sweep.py --config=experiments/c3po.py:parity \
        --root=experiments/results/c3po_parity --figures=experiments/figures/c3po_parity \
        --plot_only                     # the parity table and figures from the extracts

Args (comma-separated after ':'):
  mode=sync|c3po|paced|async   the scheduler (default c3po)
  phi=N, sigma=N, k=N      C3PO++ budget Φ and bound σ_max; async staleness k
  seed=N
  sft                      SFT warm start only (rl.num_steps = 0)
  local                    the CPU size of the older studies
  parity                   the parity study's evaluation (1024 problems, every 20 steps)
  parity_v2                study 4b: its task mix, held-out split, recipe and evaluation
  lr=X                     the RL learning rate (study 4b's pilot only)
  smoke                    a tiny run for the end-to-end test (learns nothing)

Expected. ``parity`` (measured, 5 seeds, 59 min on the shared 2-core CPU at load 7-19;
experiments/REPRODUCING.md "Study 4"): paced C3PO++ equivalent to sync within ±0.05 on held-out
pass@1 (paced − sync −0.009, 90% CI [−0.017, −0.001], TOST p = 0.0002), but lower in 5 of 5
seeds, on a pass@1 of only 0.03-0.09 that 60 RL steps lower in both arms (−1.7 / −2.6 points);
nothing purged, the same mean trained length (+0.3 tokens, n.s.); 29 vs 52 decode steps per RL
step, slot use 79% vs 42%. The older studies (``local``; their write-up is withdrawn): C3PO++
cut decode steps ~3x and kept the slots busy, async overlapped generation with the train step
on the second core, σ_max = 1-2 purged 15-35% of the responses, the long ones. Every
wall-clock figure depends on the machine's load: compare arms of the same seed run back to back
and read the ratios, not the absolute seconds. ``parity_v2`` (study 4b, measured, 5 seeds from
one shared warm start, 33 min; REPRODUCING.md "Study 4b"): RL raises held-out pass@1 from 0.662
to 0.763 in both arms (+10.0 points each); paced equivalent to sync within ±0.05 (+0.000, 90% CI
[−0.009, +0.009], TOST p = 0.0002); nothing purged, trained length level; 30 vs 53 decode steps
per RL step, slot use 93% vs 55%.
"""
import json
import os
import sys

import ml_collections
import numpy as np

from experiments import common
from ring_jax.train import metrics as metrics_lib
from ring_jax.train.experiment import complete, parse_config_arg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stats  # noqa: E402  (experiments/stats.py, beside this file)

SEEDS = (0, 1, 2)
DEFAULT_PHI, DEFAULT_SIGMA = 1024, 4
STUDIES = {
    "modes": {"sync": "mode=sync", "async": "mode=async", "c3po": "mode=c3po",
              "paced": "mode=paced"},
    "budget": {f"c3po_phi{p}": f"mode=c3po,phi={p}" for p in (512, DEFAULT_PHI, 2048)},
    "staleness": {**{f"c3po_sigma{s}": f"mode=c3po,sigma={s}" for s in (1, 2, DEFAULT_SIGMA)},
                  "paced_sigma1": "mode=paced,sigma=1"},
}
# Arms at the defaults are the "modes" study's c3po runs: same workdir, run once.
SAME_AS = {f"c3po_phi{DEFAULT_PHI}": "c3po", f"c3po_sigma{DEFAULT_SIGMA}": "c3po"}
# How sweep.py reports this study: these curves, against the seconds spent in RL steps (no
# start-up, no evaluation), and table.md averaging the second half of the run, steps 31-60:
# without engine.warmup_buckets (now on) the engine compiled a prefill program for each new
# (rows, length) bucket the first time it met it, and C3PO++'s refills meet many more buckets
# than sync's one batch-sized prefill, so the first steps' times were mostly compilation.
STUDY_METRICS = ("rl/reward_mean", "eval/pass@1", "perf/rollout_s", "perf/train_s",
                 "perf/step_s", "perf/trained_tokens_per_s", "rl/response_tokens",
                 "sched/versions_spanned_mean", "mismatch/masked_frac", "moe/dropped_frac",
                 "sched/trained_response_len_mean", "sched/trained_response_len_p90",
                 "sched/responses_purged")
TIME_KEY = "time/rl_s"
TABLE_LAST = 30

# The parity study (issue 14 item 5; design and readouts in the module docstring, fixed before
# its runs): sync (the baseline) vs paced C3PO++, paired by seed, held-out greedy pass@1.
PARITY_SEEDS = (0, 1, 2, 3, 4)
PARITY_ARMS = {"sync": "mode=sync", "paced": "mode=paced"}
PARITY_EVAL_PROMPTS = 1024
PARITY_MARGIN = 0.05  # the TOST equivalence margin on the paired pass@1 difference
BASELINE = {"parity": "sync", "parity_v2": "sync"}
# Study 4b (issue 14; design declared in the module docstring before its runs): sizes 2-10 with
# the same tail, a held-out split large enough that the evaluation set keeps the training mix,
# and an RL recipe piloted (seed PARITY_V2_PILOT_SEED) to raise held-out pass@1 under sync.
PARITY_V2 = dict(task=dict(min_size=2, max_size=10, size_tail=1.5, eval_fraction=0.25),
                 sft_steps=1000, rl_steps=60, learning_rate=1e-4, eval_every=20)
PARITY_V2_SFT = "sft_s0"  # study 4b's one SFT warm start, shared by every seed and arm
PARITY_V2_SEEDS = (0, 1, 2, 3, 4)
PARITY_V2_PILOT_SEED = 100  # not a study seed
LAST_EVALS = 2  # the primary outcome: pass@1 averaged over the evaluations at steps 40 and 60


def _run_mean_readout(metric: str) -> stats.Readout:
    """A run's mean of the per-step ``metric`` over all its RL steps (None if never logged)."""
    def readout(records):
        values = [r[metric] for r in records if isinstance(r.get(metric), (int, float))
                  and np.isfinite(r[metric])]
        return float(np.mean(values)) if values else None
    readout.description = f"mean over the run's RL steps of {metric}"
    return readout


def _pass_at_1(records) -> list[float]:
    return [r["eval/pass@1"] for r in sorted(records, key=lambda r: r.get("step", 0))
            if isinstance(r.get("eval/pass@1"), (int, float))]


def _rl_gain_points(records):
    """Held-out pass@1, mean of the last LAST_EVALS evaluations minus the one before RL, in
    points (× 100: table.md prints readouts with one decimal)."""
    evals = _pass_at_1(records)
    if len(evals) < 2:
        return None
    return 100.0 * (stats.last_evaluations_mean(evals, LAST_EVALS) - evals[0])


_rl_gain_points.description = (f"held-out pass@1 mean of the last {LAST_EVALS} evaluations − "
                               "pass@1 before RL, in points (how far RL moved the policy)")

READOUTS = {
    "trained len mean": _run_mean_readout("sched/trained_response_len_mean"),
    "trained len p90": _run_mean_readout("sched/trained_response_len_p90"),
    "RL gain pass@1 pts": _rl_gain_points,
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    known_flags = {"sft", "local", "smoke", "parity", "parity_v2"}
    known_values = {"mode", "phi", "sigma", "k", "seed", "lr"}
    flags, values = parse_config_arg(arg, known_flags, known_values)
    c = common.base_config()
    c.seed = int(values.get("seed", 0))
    c.task.kwargs = dict(min_size=1, max_size=12, size_tail=1.5, show_steps=True)
    c.sft.update(seq_len=192, num_steps=400)
    c.rl.num_steps = 60
    c.rl.optim.learning_rate = 2e-4
    c.scheduler.update(mode=values.get("mode", "c3po"), batch_size=32, max_seq_len=176,
                       token_budget=int(values.get("phi", DEFAULT_PHI)),
                       sigma_max=int(values.get("sigma", DEFAULT_SIGMA)),
                       max_staleness=int(values.get("k", 1)), max_active_requests=64)
    c.scheduler.sampling.max_new_tokens = 128
    c.engine.max_len = 176
    c.engine.warmup_buckets = True  # compile every prefill bucket before step 1 (issue 14)
    c.eval.update(every=10, num_prompts=256, num_samples=2)
    c.checkpoint.update(save_every=20, max_to_keep=1)
    if "parity" in flags:  # greedy pass@1 on a larger fixed held-out set, every 20 steps
        c.eval.update(every=20, num_prompts=PARITY_EVAL_PROMPTS, num_samples=1)
    if "parity_v2" in flags:  # study 4b: the mix, held-out split and recipe of PARITY_V2
        c.task.kwargs = dict(PARITY_V2["task"], show_steps=True)
        c.sft.num_steps = PARITY_V2["sft_steps"]
        c.rl.num_steps = PARITY_V2["rl_steps"]
        c.rl.optim.learning_rate = PARITY_V2["learning_rate"]
        c.eval.update(every=PARITY_V2["eval_every"], num_prompts=PARITY_EVAL_PROMPTS,
                      num_samples=1)
    if "lr" in values:  # pilots only: the RL learning rate (its range is checked at load)
        try:
            c.rl.optim.learning_rate = float(values["lr"])
        except ValueError:
            raise ValueError(f"arg lr={values['lr']!r} is invalid: it sets "
                             "rl.optim.learning_rate and must be a number, e.g. lr=1e-4") from None
    # sweep.py points init_from at the seed's SFT workdir (and sets sft.num_steps=0).
    if "smoke" in flags:
        common.shrink_to_smoke(c, token_budget=min(c.scheduler.token_budget, 128),
                               max_new_tokens=24)
        c.engine.warmup_buckets = False  # 3 steps: compiling all 30 buckets would dominate
    if "sft" in flags:
        c.rl.num_steps = 0
    # "local" is the default size here; the flag is accepted so sweep.py's FILE:SIZE works.
    return complete(c)


def get_sweep(arg: str = "") -> list[dict]:
    """One SFT warm start per seed, then every study's arms × seeds initialised from it (runs
    shared between studies run once). Run dicts as in experiments/icepop.py. ``parity`` /
    ``parity_v2``: that parity study alone (study 4 / 4b: its own SFT warm starts, seeds
    `PARITY_SEEDS` / `PARITY_V2_SEEDS`); a size flag may follow (``parity_v2,smoke``)."""
    parity_study = arg.partition(",")[0]  # "parity_v2,smoke": study 4b at the smoke size
    if parity_study in ("parity", "parity_v2"):
        seeds = PARITY_SEEDS if parity_study == "parity" else PARITY_V2_SEEDS
        sft_seeds = seeds if parity_study == "parity" else (0,)  # 4b: one shared warm start
        runs = [dict(name=f"sft_s{s}", arg=f"sft,seed={s},{arg}", study="sft", label="sft",
                     init=None) for s in sft_seeds]
        return runs + [dict(name=f"{label}_s{s}", arg=f"{arm},seed={s},{arg}",
                            study=parity_study, label=label,
                            init=f"sft_s{s}" if parity_study == "parity" else PARITY_V2_SFT)
                       for s in seeds for label, arm in PARITY_ARMS.items()]
    size = "," + arg if arg else ""
    runs = [dict(name=f"sft_s{s}", arg=f"sft,seed={s}{size}", study="sft", label="sft",
                 init=None) for s in SEEDS]
    for study, arms in STUDIES.items():
        for s in SEEDS:
            for label, arm in arms.items():
                shared = SAME_AS.get(label, label)
                runs.append(dict(name=f"{shared}_s{s}",
                                 arg=f"{STUDIES['modes'].get(shared, arm)},seed={s}{size}",
                                 study=study, label=label, init=f"sft_s{s}"))
    return runs


# Per-step work of a run over its last TABLE_LAST steps, from its metrics.jsonl: (column
# header, how to get it from the sums ``t`` (metric -> sum over those steps), the step count
# ``n`` and the engine's number of slots).
WORK_COLUMNS = (
    ("end to end s/step", lambda t, n, slots: t["perf/step_s"] / n),
    ("trainer waits for rollouts s/step", lambda t, n, slots: t["perf/rollout_s"] / n),
    ("train s/step", lambda t, n, slots: t["perf/train_s"] / n),
    ("rollout wait / train", lambda t, n, slots: t["perf/rollout_s"] / t["perf/train_s"]),
    ("engine prefill s/step", lambda t, n, slots: t["rollout/engine/prefill_s"] / n),
    ("engine decode s/step", lambda t, n, slots: t["rollout/engine/decode_s"] / n),
    ("decode steps/step", lambda t, n, slots: t["rollout/engine/decode_steps"] / n),
    ("slot use %", lambda t, n, slots: 100 * t["rollout/engine/decode_tokens"] / max(
        t["rollout/engine/decode_steps"] * slots, 1)),
    ("prefill calls/step", lambda t, n, slots: t["rollout/engine/prefill_calls"] / n),
    ("prefilled tokens/step", lambda t, n, slots: t["rollout/engine/prefill_tokens"] / n),
    ("of which re-prefilled", lambda t, n, slots: t["rollout/engine/prefill_resumed_tokens"] / n),
    ("generated tokens/step", lambda t, n, slots: t["rollout/tokens_generated"] / n),
    ("trained tokens/step", lambda t, n, slots: t["rl/response_tokens"] / n),
)


_KEYS = ("perf/step_s", "perf/rollout_s", "perf/train_s", "rollout/engine/prefill_s",
         "rollout/engine/decode_s", "rollout/engine/decode_steps", "rollout/engine/decode_tokens",
         "rollout/engine/prefill_tokens", "rollout/engine/prefill_resumed_tokens",
         "rollout/engine/prefill_calls",
         "rollout/tokens_generated", "rl/response_tokens")
# What sweep.py --extract keeps besides STUDY_METRICS: the work table's keys (extra_table
# regenerates from the extracts), evaluations, clocks and scheduler totals; no per-position
# mismatch or entropy curves (they would double the extracts' size).
EXTRACT_KEYS = _KEYS
EXTRACT_PREFIXES = ("step", "eval/", "time/rl_s", "time/elapsed_s", "sched/total/")


def _work(workdir: str) -> list[float]:
    """The WORK_COLUMNS of one run."""
    records = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    last_step = max(r.get("step", 0) for r in records)
    records = [r for r in records if r.get("step", 0) > last_step - TABLE_LAST]
    totals = dict.fromkeys(_KEYS, 0.0)
    for r in records:  # a metric missing from a step (no rollout iteration in it) counts 0
        for key in _KEYS:
            if isinstance(r.get(key), (int, float)):
                totals[key] += float(r[key])
    with open(os.path.join(workdir, metrics_lib.CONFIG_FILE)) as f:
        slots = json.load(f)["engine"]["num_slots"]
    return [fn(totals, max(len(records), 1), slots) for _, fn in WORK_COLUMNS]


def extra_table(groups: dict[str, list[str]]) -> str:
    """Where each arm's time goes (sweep.py appends it to table.md): per-step means over the
    last TABLE_LAST steps of each seed, then mean ± std over seeds, and each arm's end-to-end
    speed-up over the sync run of the same seed beside it (``sync_s<seed>``; arms of one seed
    run back to back, so they share the machine's load more than arms of different seeds)."""
    header = ["arm", "seeds"] + [name for name, _ in WORK_COLUMNS] + [
        "end-to-end speed-up over sync"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cache: dict[str, list[float]] = {}  # each run's metrics.jsonl is read once

    def work(workdir: str) -> list[float]:
        if workdir not in cache:
            cache[workdir] = _work(workdir)
        return cache[workdir]

    for label, workdirs in groups.items():
        rows = np.asarray([work(os.path.normpath(w)) for w in workdirs])
        cells = [f"{m:.3g} ± {sd:.2g}" if len(rows) > 1 else f"{m:.3g}"
                 for m, sd in zip(rows.mean(0), rows.std(0))]
        speedups = []
        for workdir, row in zip(workdirs, rows):
            seed = os.path.basename(os.path.normpath(workdir)).rsplit("_s", 1)[1]
            sync = os.path.join(os.path.dirname(os.path.normpath(workdir)), f"sync_s{seed}")
            if os.path.exists(os.path.join(sync, "metrics.jsonl")):
                speedups.append(work(sync)[0] / row[0])
        cells.append(f"{np.mean(speedups):.2f} ± {np.std(speedups):.2f}" if speedups else "–")
        lines.append(f"| {label} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + equivalence_table(groups)


PARITY_FIGURE_METRICS = ("eval/pass@1", "rl/reward_mean", "sched/trained_response_len_mean")


def extra_figures(groups: dict[str, list[str]], out_dir: str, baseline: str | None) -> str:
    """sweep.py's hook: ``curves_per_seed_vs_rl_time.png``, every seed's own curve (thin, one
    colour per arm; arm means would need a common time grid, and seeds under different machine
    load share little of one) of `PARITY_FIGURE_METRICS` against ``time/rl_s``; an evaluation
    is placed at its step's RL seconds (0 before RL). Reward and length: 5-step moving mean."""
    import plot  # noqa: E402  (experiments/plot.py; sweep.py put its directory on sys.path)
    plt, fig, axes = plot._figure(len(PARITY_FIGURE_METRICS))
    for i, (label, workdirs) in enumerate(groups.items()):
        for j, workdir in enumerate(workdirs):
            records = plot.read_metrics(workdir)
            rl_s = {r["step"]: r["time/rl_s"] for r in records if "time/rl_s" in r}
            rl_s[0] = 0.0
            for ax, metric in zip(axes, PARITY_FIGURE_METRICS):
                steps, values = plot.series(records, metric)
                x = np.asarray([rl_s.get(int(step), np.nan) for step in steps]) / 60.0
                if metric != "eval/pass@1":
                    values = plot.smooth(values, 5)
                ax.plot(x, values, color=f"C{i}", lw=1, alpha=0.8,
                        marker="o" if metric == "eval/pass@1" else None, ms=3,
                        label=label if j == 0 else None)
    for ax, metric in zip(axes, PARITY_FIGURE_METRICS):
        ax.set(title=metric, xlabel="time/rl_s (min)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "curves_per_seed_vs_rl_time.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _primary_outcome(workdir: str) -> float:
    """Held-out greedy pass@1, mean of the run's last LAST_EVALS evaluations."""
    records = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return stats.last_evaluations_mean(_pass_at_1(records), LAST_EVALS)


def equivalence_table(groups: dict[str, list[str]], baseline: str = "sync",
                      margin: float = PARITY_MARGIN) -> str:
    """The parity verdict of every arm against ``baseline``: a TOST (`stats.tost`) at ±``margin``
    of the per-seed paired differences of held-out pass@1 (mean of the last LAST_EVALS
    evaluations); "" when the study has no ``baseline`` arm."""
    if baseline not in groups:
        return ""
    by_seed = {label: {int(os.path.basename(os.path.normpath(w)).rsplit("_s", 1)[1]):
                       _primary_outcome(w) for w in workdirs}
               for label, workdirs in groups.items()}
    lines = [f"Equivalence to {baseline} (TOST at ±{margin:g}, α = 0.05; paired per seed: "
             f"held-out pass@1, mean of the last {LAST_EVALS} evaluations, arm − {baseline}):",
             ""]
    for label, arm in by_seed.items():
        if label == baseline:
            continue
        seeds = sorted(set(arm) & set(by_seed[baseline]))
        diffs = [arm[s] - by_seed[baseline][s] for s in seeds]
        lines.append(f"- {label}: " + stats.format_equivalence(stats.tost(diffs, margin))
                     + "; per seed " + ", ".join(f"s{s} {d:+.3f}" for s, d in zip(seeds, diffs)))
    return "\n".join(lines) + "\n"
