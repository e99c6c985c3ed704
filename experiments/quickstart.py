"""Quickstart: a tiny MoE learns multi-digit addition with GRPO + IcePop + C3PO++ on a CPU.

README's main job. Stage 1 warm-starts the tiny Ling-2.0 MoE (`tiny` preset, < 1M params,
byte tokenizer) with a short SFT on worked answers; stage 2 runs GRPO with the IcePop
correction (α=0.5, β=5, PAPER §1) on rollouts scheduled by C3PO++ (token budget Φ per
iteration, partial responses carried across policy versions with σ_max=2, PAPER §2) from a
bf16 inference engine, while the trainer computes in fp32 — so the training-inference mismatch
that IcePop masks is real.

Command:
    python -m ring_jax.main --config=experiments/quickstart.py --workdir=runs/quickstart
    python experiments/plot.py runs/quickstart        # PNG curves next to metrics.jsonl

Args (comma-separated after ':'): ``sync`` swaps C3PO++ for the synchronous scheduler,
``tis`` / ``none`` / ``kpop`` swap the correction (at most one), ``smoke`` shrinks everything
to a run of a minute or two for the end-to-end tests (it learns nothing). An unknown arg is an
error. The recipe itself is `experiments/common.py`'s ``base_config()``, shared by the studies.

Expected (2-core CPU): see README.md's quickstart section for the measured figures.
"""
import ml_collections

from experiments import common
from ring_jax.train.experiment import complete, parse_config_arg

CORRECTION_FLAGS = ("tis", "none", "kpop")  # IcePop (the base's correction) unless one is given


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    flags, _ = parse_config_arg(arg, {"sync", "smoke", *CORRECTION_FLAGS}, set())
    corrections = sorted(flags & set(CORRECTION_FLAGS))
    if len(corrections) > 1:
        raise ValueError(f"args {corrections}: choose at most one correction")
    c = common.base_config()
    if "sync" in flags:
        c.scheduler.mode = "sync"
    if corrections:
        c.rl.loss.correction = corrections[0]
    if "smoke" in flags:
        common.shrink_to_smoke(c)
    return complete(c)
