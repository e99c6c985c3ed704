"""Wall-time breakdown of one RL iteration on the `small` MoE, and trained tokens/s.

One iteration of the loop in `ring_jax/train/rl_loop.py`, each phase timed on its own (the
scheduler runs ``sync`` mode so one batch is exactly one rollout phase):

  rollout     engine generation of B responses (scheduler.next_batch, rewards included)
  reward      seconds spent inside the reward function (on the scheduler's worker threads,
              overlapping generation: part of ``rollout``, not added to the total)
  logprob     log π_train(θ_old) recompute (the train step's first forward), timed alone
  update      the whole jitted train step minus its log-prob recompute (the iteration runs
              the train step once; the standalone log-prob timing is not counted in total)
  weight_sync engine.load_weights (cast to bf16 + install), blocked until done
  checkpoint  an orbax save of the train state + scheduler state, waited for

    python experiments/benchmarks/rl_step.py [--preset=small --batch_size=32 --new_tokens=64]

Prints each phase's median over ``--iters`` iterations, its share of the iteration, and trained
response tokens per second of the whole iteration.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from ring_jax.data import pipeline, rewards, tasks
from ring_jax.data.tokenizer import get_tokenizer
from ring_jax.model import Transformer, presets
from ring_jax.rl import advantages, losses
from ring_jax.rollout.engine import Engine, EngineConfig
from ring_jax.rollout.precision import InferencePrecision
from ring_jax.rollout.types import SamplingParams
from ring_jax.scheduler import Scheduler, SchedulerConfig
from ring_jax.train import checkpoint, optim, rl_step

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "small", "model preset")
flags.DEFINE_integer("batch_size", 32, "responses per RL batch (B)")
flags.DEFINE_integer("group_size", 8, "G")
flags.DEFINE_integer("new_tokens", 64, "max new tokens per response")
flags.DEFINE_integer("iters", 3, "measured iterations (after one warm-up)")


def _timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def main(_):
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    cfg = dataclasses.replace(presets.get(FLAGS.preset), moe_impl="capacity")
    model = Transformer(cfg)
    tok = get_tokenizer("byte")
    task = tasks.get("addition", min_size=2, max_size=3)
    max_len = 32 + FLAGS.new_tokens
    sampling = SamplingParams(max_new_tokens=FLAGS.new_tokens, min_new_tokens=FLAGS.new_tokens,
                              stop_token_ids=(tok.eos_id,))
    sched_cfg = SchedulerConfig(mode="sync", group_size=FLAGS.group_size,
                                batch_size=FLAGS.batch_size, max_seq_len=max_len,
                                sampling=sampling, num_reward_workers=2)
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-5))
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, max_len), jnp.int32))
    state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
             "opt_state": tx.init(variables["params"]), "router": variables["router"]}
    engine = Engine.from_model(cfg, variables, EngineConfig(num_slots=FLAGS.batch_size,
                                                            max_len=max_len, decode_chunk=16),
                               InferencePrecision("bfloat16"), moe_impl="capacity")
    score = rewards.make_reward_fn(rewards.RewardConfig(), task, tok)
    reward_seconds = [0.0]

    def reward_fn(record, response_tokens, finish_reason):
        t0 = time.perf_counter()
        out = score(record, response_tokens, finish_reason)
        reward_seconds[0] += time.perf_counter() - t0  # GIL-atomic enough for a benchmark
        return out

    adv_cfg = advantages.AdvantageConfig()
    sched = Scheduler(
        sched_cfg, engine,
        pipeline.prompt_iterator(pipeline.prompt_dataset(task, tok, num_epochs=None,
                                                         num_prompts=10_000)),
        reward_fn=lambda rec, req: reward_fn(rec, req.tokens, req.finish_reason),
        advantage_fn=lambda r: np.asarray(advantages.compute_advantages(
            jnp.asarray(r)[None], adv_cfg).advantages[0]))
    step = jax.jit(rl_step.make_rl_train_step(model, tx, losses.LossConfig(),
                                              logprob_chunk=64))
    logprob = jax.jit(rl_step.make_logprob_fn(model, chunk_size=64, router_replay=False))
    ckpt = checkpoint.Checkpointer(tempfile.mkdtemp(), checkpoint.CheckpointConfig(
        async_save=False, max_to_keep=1))

    phases = {k: [] for k in ("rollout", "reward", "logprob", "update", "weight_sync",
                              "checkpoint", "total")}
    tokens = []
    for it in range(FLAGS.iters + 1):
        t_start = time.perf_counter()
        reward_seconds[0] = 0.0
        batch, t_rollout = _timed(sched.next_batch)
        t_reward = reward_seconds[0]
        _, t_logprob = _timed(lambda: logprob(state["params"], state["router"], batch))
        (state, _), t_step = _timed(lambda: step(state, batch))
        variables = {"params": state["params"], "router": state["router"]}
        _, t_sync = _timed(lambda: (engine.load_weights(variables, it + 1), engine.variables)[1])
        t0 = time.perf_counter()
        ckpt.save(it + 1, state=state, arrays=sched.state_dict())
        ckpt.wait()
        t_ckpt = time.perf_counter() - t0
        sched.update_weights(variables, it + 1)
        # The standalone log-prob timing is a measurement, not part of the iteration.
        total = time.perf_counter() - t_start - t_logprob
        if it == 0:
            continue  # compiles
        for k, v in (("rollout", t_rollout), ("reward", t_reward), ("logprob", t_logprob),
                     ("update", t_step - t_logprob), ("weight_sync", t_sync),
                     ("checkpoint", t_ckpt), ("total", total)):
            phases[k].append(v)
        tokens.append(float(batch["loss_mask_BT"].sum()))
    sched.close()
    ckpt.close()

    med = {k: float(np.median(v)) for k, v in phases.items()}
    print(f"preset={FLAGS.preset} B={FLAGS.batch_size} G={FLAGS.group_size} "
          f"new_tokens={FLAGS.new_tokens} iters={FLAGS.iters} (median seconds)")
    for k, v in med.items():
        note = "  (inside rollout)" if k == "reward" else ""
        print(f"  {k:12s} {v:8.3f} s  {100 * v / med['total']:5.1f}%{note}")
    print(f"  trained response tokens/s (whole iteration): "
          f"{np.median(tokens) / med['total']:.1f}")


if __name__ == "__main__":
    app.run(main)
