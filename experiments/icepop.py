"""Studies 2 and 3 of issue 7: stability of RL under a strong training-inference mismatch
(none vs TIS vs IcePop vs KPop, plus router replay R3, and none/TIS/IcePop over 200 steps), and
IcePop/KPop sensitivity (band, bound, loss aggregation).

Reproduces, at toy scale, the IcePop blog's Figs 5-10 (PAPER §1): train reward, held-out
accuracy, gradient norm, max and mean |log π_infer − log π_train|, the fraction of tokens masked
above β / below α, and the entropy of masked tokens vs all tokens, per correction, mean ± std
over seeds. Recipe: the quickstart's (tiny Ling-2.0 MoE, 2-digit addition with worked sums,
SFT warm start then GRPO with C3PO++), with the mismatch widened on purpose:

  * the engine runs in bf16 while the trainer recomputes in fp32 (the quickstart's baseline), and
  * the engine's routed-expert weights are fp8 (e4m3) quantize-dequantized, and
  * the engine's router logits get Gaussian noise of std ``noise`` (default 1.0,
    `InferencePrecision`), which flips near-tied top-2 expert choices: the MoE failure mode
    IcePop targets.

Why this level (measured, no correction, seed 0): bf16 alone gives mean |Δlog p| ≈ 0.01-0.02 and
never leaves IcePop's [0.5, 5] band (study 1); fp8 experts + σ = 1 give ≈ 0.10 (max ≈ 4-5), about
twice the ≈ 0.05 the IcePop blog names as the level where training fails, while the SFT policy
still solves ~30% of held-out problems through the noisy engine.

The trainer's MoE dispatch is dropless (capacity factor 4 = E/K of the tiny preset), so every
measured mismatch is the engine's, not tokens the trainer dropped (`derive` refuses a mismatch
knob with a dropping trainer). Evaluation: 256 held-out problems, disjoint from SFT/RL data by
construction and identical across seeds and arms.

Study 2 ("stability") of this config ran before the issue-12 harness; its table is withdrawn
(experiments/REPRODUCING.md) and replaced by Study 2b, `experiments/stability.py` (a compounding
mismatch, an fp32 control, 5 seeds × 300 steps). Study 3 below was rerun under the harness:
≈ 1.5 min per RL run and 3 min per SFT on the shared 2-core CPU, 10.5 min for 3 seeds run in
parallel.

Study 3 (sensitivity) under the issue-12 harness, declared before its rerun. The CPU is shared
(load 10+ on 2 cores), so of the former 12 arms × 3 seeds the rerun keeps the arms that test a
claim of PAPER §1 and all 3 seeds, run arm by arm in this order (the later ones only if time
allows; REPRODUCING.md says which ran):

  1. ``icepop_a0.5_b5``: the paper's IcePop (α = 0.5, β = 5): the baseline every arm is paired
     against (``BASELINE``).
  2. ``icepop_masked_removed``: masked tokens dropped from the 1/|y_i| denominator (the paper:
     keeping them matters; dropping them inflates the kept tokens' gradients).
  3. ``kpop_phi0.5``: KPop, φ = 0.5 (the follow-up reports +2–5 points over IcePop).
  4. ``icepop_token_mean``: DAPO's token-mean aggregation instead of the paper's
     sequence-mean.
  5. ``icepop_a0.5_b2``: a narrower band above (β = 2).

Cut (run before the harness, see REPRODUCING.md): the other bands (α ∈ {0.2, 0.5} × β ∈ {2, 5,
10}), KPop φ ∈ {0.1, 2} and KPop with masked tokens removed; each is one line of
``SENSITIVITY_ARMS`` to restore, e.g. ``"kpop_phi2": "correction=kpop,phi=2"``.

Readouts (declared before the rerun): per seed, held-out greedy pass@1 averaged over the last 4
evaluations (steps 10–40) and the run-mean of the pre-clip gradient norm and of the masked
fractions, each paired against ``icepop_a0.5_b5`` (bootstrap 95% CI over seeds, sign test).
A claim is **reproduced** where the paired CI excludes 0 in the paper's direction,
**contradicted** where it excludes 0 the other way, else **inconclusive** (n.s.).

Commands (a whole study, resumable; one SFT warm start per seed is shared by all its arms):

    python experiments/sweep.py --config=experiments/icepop.py:local --study=stability \
        --root=runs/icepop --figures=experiments/figures/stability
    python experiments/sweep.py --config=experiments/icepop.py:local --study=sensitivity \
        --root=runs/sens --figures=experiments/figures/sensitivity \
        --extract=experiments/results/sensitivity
    # arm by arm in the priority order above, e.g. the first two:
    python experiments/sweep.py --config=experiments/icepop.py:local --study=sensitivity \
        --arms=icepop_a0.5_b5,icepop_masked_removed --root=runs/sens \
        --figures=experiments/figures/sensitivity --extract=experiments/results/sensitivity

Figures and table.md land in <figures>/<study>/. One run by hand (with its own SFT warm start
unless ``--config.init_from=<an SFT workdir>/sft --config.sft.num_steps=0``):

    python -m ring_jax.main --config=experiments/icepop.py:correction=tis,seed=1,local \
        --workdir=runs/icepop/tis_s1

Args (comma-separated after ':'):
  correction=none|tis|icepop|kpop|seq_mask   the mismatch correction (default icepop)
  seed=N                                      run seed: init, SFT data, prompt order, sampling
                                              (`ring_jax/train/derive.py`); the evaluation set
                                              is fixed across seeds and arms
  alpha=A, beta=B, phi=F, cap=C               IcePop band, KPop bound, TIS cap
  aggregation=seq_mean_token_mean|token_mean|seq_mean_token_sum_norm
  masked=kept|removed                         masked tokens in the loss denominator (PAPER §1:
                                              kept) or removed from it (the ablation)
  r3                                          router replay: train with the engine's experts
  noise=S, nofp8, fp32                        the mismatch knobs (fp32: engine in float32, no
                                              noise, no fp8 — the matched-numerics control)
  sft                                         SFT warm start only (rl.num_steps = 0)
  local                                       the CPU size used for REPRODUCING.md (~1-2 min/run)
  long                                        200 RL steps instead of 40 (with ``local``)
  smoke                                       a tiny run for the end-to-end test (learns nothing)

Without ``local``/``smoke`` the sizes are the quickstart's (a ~5 min run on 2 CPU cores); on real
hardware, raise ``rl.num_steps`` and the model preset on the command line.
"""
import ml_collections

from experiments import common
from ring_jax.train.experiment import complete, parse_config_arg

SEEDS = (0, 1, 2)
# Study 2: the four corrections, then router replay alone and with IcePop.
STABILITY_ARMS = {
    "none": "correction=none",
    "tis": "correction=tis",
    "icepop": "correction=icepop",
    "kpop": "correction=kpop",
    "r3": "correction=none,r3",
    "r3_icepop": "correction=icepop,r3",
}
# Study 3: the paper's IcePop against masked tokens removed from the 1/|y_i| denominator, KPop,
# token-mean aggregation and a narrower band, in priority order (module docstring: the cut).
SENSITIVITY_ARMS = {
    "icepop_a0.5_b5": "correction=icepop,alpha=0.5,beta=5",
    "icepop_masked_removed": "correction=icepop,masked=removed",
    "kpop_phi0.5": "correction=kpop,phi=0.5",
    "icepop_token_mean": "correction=icepop,aggregation=token_mean",
    "icepop_a0.5_b2": "correction=icepop,alpha=0.5,beta=2",
}
# Sensitivity arms at the paper's defaults (α=0.5, β=5; φ=0.5) are study 2's own runs.
SAME_AS_STABILITY = {"icepop_a0.5_b5": "icepop", "kpop_phi0.5": "kpop",
                     "none_fp8_noise1": "none"}
# The mismatch level, measured with no correction (seed 0): bf16 alone, the chosen fp8 + σ=1,
# and a stronger σ=2.
CALIBRATION_ARMS = {
    "none_bf16": "correction=none,nofp8,noise=0",
    "none_fp8_noise1": "correction=none",  # the chosen level: study 2's "none" run
    "none_noise2": "correction=none,noise=2",
}
# Study 2 over 200 RL steps (5x the "local" length; the IcePop blog's uncorrected runs
# collapsed after ~180-200 steps).
LONG_ARMS = {"none_long": "correction=none,long", "tis_long": "correction=tis,long",
             "icepop_long": "correction=icepop,long"}
LONG_SEEDS = SEEDS
BASELINE = {"sensitivity": "icepop_a0.5_b5"}  # the arm the others are paired against


def _run_mean(metric: str):
    """Readout: the mean of ``metric`` over every step of a run (None if never logged)."""
    def readout(records):
        values = [r[metric] for r in records if isinstance(r.get(metric), (int, float))]
        return float(sum(values) / len(values)) if values else None
    readout.description = f"mean of {metric} over the run's steps"
    return readout


READOUTS = {f"{m} (run mean)": _run_mean(m) for m in (
    "train/grad_norm", "mismatch/masked_frac_above", "mismatch/masked_frac_below")}


def _masked_in_denominator(value: str) -> bool:
    if value not in ("kept", "removed"):
        raise ValueError(f"masked={value!r}: must be 'kept' or 'removed'")
    return value == "kept"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    known_flags = {"r3", "nofp8", "fp32", "sft", "local", "long", "smoke"}
    known_values = {"correction", "seed", "alpha", "beta", "phi", "cap", "aggregation", "noise",
                    "masked"}
    flags, values = parse_config_arg(arg, known_flags, known_values)
    c = common.base_config()
    c.seed = int(values.get("seed", 0))
    c.rl.router_replay = "r3" in flags
    c.rl.loss.update(correction=values.get("correction", "icepop"),
                     alpha=float(values.get("alpha", 0.5)),
                     beta=float(values.get("beta", 5.0)),
                     kpop_phi=float(values.get("phi", 0.5)),
                     tis_cap=float(values.get("cap", 2.0)),
                     aggregation=values.get("aggregation", "seq_mean_token_mean"),
                     masked_in_denominator=_masked_in_denominator(values.get("masked", "kept")))
    c.engine.record_expert_ids = "r3" in flags
    # The mismatch knobs (module docstring).
    if "fp32" in flags:
        c.precision = dict(dtype="float32", fp8_expert_weights=False, router_noise_std=0.0)
    else:
        c.precision = dict(dtype="bfloat16", fp8_expert_weights="nofp8" not in flags,
                           router_noise_std=float(values.get("noise", 1.0)))
    c.checkpoint.max_to_keep = 1
    c.model.capacity_factor = 4.0  # E/K: a dropless trainer, so all mismatch is the engine's
    # sweep.py points init_from at the seed's SFT workdir (and sets sft.num_steps=0).

    if "local" in flags:
        # ~1-2 min per RL arm on 2 CPU cores: fewer, smaller steps, a lighter evaluation.
        c.rl.num_steps = 40
        c.rl.optim.learning_rate = 2e-4
        c.scheduler.update(batch_size=32, token_budget=384, max_active_requests=64)
        c.eval.update(every=10, num_prompts=256, num_samples=2)
        c.checkpoint.save_every = 20
    if "long" in flags:
        c.rl.num_steps = 200
        c.eval.every = 20
        c.checkpoint.save_every = 50
    if "smoke" in flags:
        common.shrink_to_smoke(c)
    if "sft" in flags:
        c.rl.num_steps = 0
    return complete(c)


def get_sweep(arg: str = "") -> list[dict]:
    """The runs of both studies at size ``arg`` (e.g. "local", "smoke"): one SFT warm start per
    seed, then every arm × seed initialised from it, the seed-0 calibration arms and the 200-step
    "long" arms. Each run is {"name", "arg", "study" ("sft" | "stability" | "sensitivity" |
    "calibration" | "long"), "label", "init" (the name of the run whose workdir is the arm's
    ``init_from``, or None)}."""
    size = "," + arg if arg else ""
    runs = [dict(name=f"sft_s{s}", arg=f"sft,seed={s}{size}", study="sft", label="sft",
                 init=None) for s in SEEDS]
    for study, arms in (("stability", STABILITY_ARMS), ("sensitivity", SENSITIVITY_ARMS)):
        for s in SEEDS:
            for label, arm in arms.items():
                # The paper's defaults are study 2's runs: same workdir, run once.
                shared = SAME_AS_STABILITY.get(label, label)
                if shared != label:
                    arm = STABILITY_ARMS[shared]
                runs.append(dict(name=f"{shared}_s{s}", arg=f"{arm},seed={s}{size}",
                                 study=study, label=label, init=f"sft_s{s}"))
    for label, arm in CALIBRATION_ARMS.items():
        shared = SAME_AS_STABILITY.get(label, label)
        runs.append(dict(name=f"{shared}_s0", arg=f"{arm},seed=0{size}", study="calibration",
                         label=label, init="sft_s0"))
    for s in LONG_SEEDS:
        for label, arm in LONG_ARMS.items():
            runs.append(dict(name=f"{label}_s{s}", arg=f"{arm},seed={s}{size}", study="long",
                             label=label, init=f"sft_s{s}"))
    return runs
