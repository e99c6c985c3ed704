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
``tis`` / ``none`` / ``kpop`` swap the correction, ``smoke`` shrinks everything to a
run of a minute or two for the end-to-end tests (it learns nothing).

Expected (2-core CPU): see README.md's quickstart section for the measured figures.
"""
import ml_collections

from ring_jax.train.experiment import complete, model_section, parse_config_arg


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args, _ = parse_config_arg(arg, {"sync", "tis", "none", "kpop", "smoke"}, set())
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = model_section("tiny", moe_impl="capacity")
    c.task = dict(name="addition", kwargs=dict(min_size=2, max_size=2, show_steps=True), num_prompts=100_000,
                  tokenizer="byte", thinking=True)
    c.sft = dict(seq_len=128, batch_size=16, num_steps=300, log_every=50)
    c.sft_optim = dict(learning_rate=3e-3, warmup_steps=20, clip_norm=1.0)
    c.rl = dict(num_steps=200, num_minibatches=2, router_bias_rate=1e-3, logprob_chunk=64,
                advantage=dict(estimator="grpo"),
                loss=dict(correction="icepop", alpha=0.5, beta=5.0, eps_low=0.2, eps_high=0.28,
                          aggregation="seq_mean_token_mean"),
                optim=dict(learning_rate=1e-4, warmup_steps=5, clip_norm=1.0))
    c.scheduler = dict(mode="c3po", group_size=8, batch_size=64, max_seq_len=96,
                       token_budget=512, sigma_max=2, max_active_requests=96,
                       step_chunk_tokens=256, num_reward_workers=2,
                       sampling=dict(temperature=1.0, max_new_tokens=40))
    c.engine = dict(num_slots=32, max_len=96, decode_chunk=8)
    c.engine_moe_impl = "capacity"
    c.precision = dict(dtype="bfloat16")
    c.reward = dict(name="task")
    c.eval = dict(every=25, num_prompts=64, num_samples=4)
    c.checkpoint = dict(save_every=25, max_to_keep=2)
    c.mesh = dict(data=-1)
    c.init_from = ""  # an SFT/RL workdir or a local HF checkpoint to start from

    if "sync" in args:
        c.scheduler.mode = "sync"
    for correction in ("tis", "none", "kpop"):
        if correction in args:
            c.rl.loss.correction = correction
    if "smoke" in args:
        c.sft.num_steps, c.rl.num_steps = 4, 3
        c.scheduler.update(group_size=4, batch_size=8, token_budget=64, max_active_requests=16)
        c.scheduler.sampling.max_new_tokens = 16
        c.rl.num_minibatches = 1
        c.eval.update(every=2, num_prompts=4, num_samples=2)
        c.checkpoint.save_every = 1
    return complete(c)
