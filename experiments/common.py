"""The base every study config starts from, and the ``smoke`` shrink they share.

`base_config()` is the quickstart's recipe (README, PAPER §1-2): the tiny Ling-2.0 MoE
(`tiny` preset, capacity dispatch), 2-digit addition with worked column sums and a byte
tokenizer, a short SFT warm start, then GRPO with IcePop (α=0.5, β=5) on rollouts scheduled by
C3PO++ (Φ=512 new tokens per iteration, σ_max=2) from a bf16 engine while the trainer computes
in fp32. A study config (`experiments/quickstart.py`, `icepop.py`, `c3po.py`) takes it, changes
the fields its study is about, applies its args, and returns ``experiment.complete(c)``:

    from experiments import common
    from ring_jax.train.experiment import complete, parse_config_arg

    def get_config(arg=""):
        flags, values = parse_config_arg(arg, {"smoke"}, {"seed"})
        c = common.base_config()
        c.seed = int(values.get("seed", 0))
        if "smoke" in flags:
            common.shrink_to_smoke(c)
        return complete(c)

Defaults shared by every study (eval size, checkpoint cadence, ...) change here, in one line.
Config files import this module as ``experiments.common``, so the repository root must be on
``sys.path``: true for ``python -m ring_jax.main`` run from it, the launchers (they set
``PYTHONPATH``), ``experiments/sweep.py`` and the tests.
"""
import ml_collections

from ring_jax.train.experiment import model_section


def base_config() -> ml_collections.ConfigDict:
    """The quickstart recipe as a ConfigDict (not yet `complete`d); see the module docstring."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = model_section("tiny", moe_impl="capacity")
    c.task = dict(name="addition", kwargs=dict(min_size=2, max_size=2, show_steps=True),
                  num_prompts=100_000, tokenizer="byte", thinking=True)
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
    c.eval = dict(every=25, num_prompts=256, num_samples=4)
    c.checkpoint = dict(save_every=25, max_to_keep=2)
    c.mesh = dict(data=-1)
    c.init_from = ""  # an SFT/RL workdir or a local HF checkpoint to start from
    return c


def shrink_to_smoke(c: ml_collections.ConfigDict, *, token_budget: int = 64,
                    max_new_tokens: int = 16) -> None:
    """In place: the ``smoke`` size of the end-to-end tests, a run of a minute or two that learns
    nothing (4 SFT steps, 3 RL steps of 2 groups of 4, a checkpoint every step)."""
    c.sft.num_steps, c.rl.num_steps = 4, 3
    c.scheduler.update(group_size=4, batch_size=8, token_budget=token_budget,
                       max_active_requests=16)
    c.scheduler.sampling.max_new_tokens = max_new_tokens
    c.rl.num_minibatches = 1
    c.eval.update(every=2, num_prompts=4, num_samples=2)
    c.checkpoint.save_every = 1
