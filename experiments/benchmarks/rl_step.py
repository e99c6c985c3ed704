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

Prints each phase's median over ``--iters`` iterations, its share of the iteration, trained
response tokens per second of the whole iteration, and the train step's MFU: PaLM's model FLOPs
of the update (6·active params + 12·L·H·Q·T per row token, fwd + bwd) over the step's time, as
a fraction of an f32 square matmul of the same FLOPs timed right before each step (the θ_old
forward counts as time, not as model FLOPs).

``--preset=qwen3_moe_matched`` is the shape of issue 16's Tunix comparison (Qwen3-MoE style:
4 layers, d=256, 4 heads × 64, 2 KV heads, 16 experts top-4 with softmax routing, expert FFN
512, no shared expert or dense layer, qk-norm; 26M params; with ``--batch_size=32
--group_size=8`` that is 4 prompts × G=8). ``--logp_old_from_update`` skips the θ_old
recompute (exact with one minibatch, `rl_step`); ``--engine_moe_impl`` picks the engine's
dispatch.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from ring_jax.data import pipeline, rewards, tasks
from ring_jax.data.tokenizer import get_tokenizer
from ring_jax.model import ModelConfig, Transformer, presets
from ring_jax.rl import advantages, losses
from ring_jax.rollout.engine import Engine, EngineConfig
from ring_jax.rollout.precision import InferencePrecision
from ring_jax.rollout.types import SamplingParams
from ring_jax.scheduler import Scheduler, SchedulerConfig
from ring_jax.train import checkpoint, optim, rl_step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import peak_matmul  # noqa: E402

# Issue 16's matched shape: Tunix's Qwen3 MoE at 26M params (vocab: the byte tokenizer's 512).
QWEN3_MOE_MATCHED = ModelConfig(
    vocab_size=512, num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
    intermediate_size=512, first_k_dense_replace=0, num_experts=16, num_experts_per_tok=4,
    num_shared_experts=0, moe_intermediate_size=512, n_group=1, topk_group=1,
    routed_scaling_factor=1.0, score_function="softmax", norm_topk_prob=True,
    use_qk_norm=True, partial_rotary_factor=1.0, rope_theta=1e6, max_position_embeddings=4096)

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "small", "model preset, or qwen3_moe_matched")
flags.DEFINE_string("engine_moe_impl", "dropless_capacity", "the engine's MoE dispatch")
flags.DEFINE_string("engine_dtype", "bfloat16", "the engine's inference dtype")
flags.DEFINE_bool("logp_old_from_update", False, "skip the θ_old recompute (exact here)")
flags.DEFINE_integer("batch_size", 32, "responses per RL batch (B)")
flags.DEFINE_integer("group_size", 8, "G")
flags.DEFINE_integer("new_tokens", 64, "max new tokens per response")
flags.DEFINE_integer("iters", 3, "measured iterations (after one warm-up)")


def _timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """PaLM's model FLOPs of one trained token (forward + backward): 6·N_active plus the
    attention scores and values 12·L·H·Q·T."""
    _, active = presets.param_count(cfg)
    return 6 * active + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def main(_):
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    base = QWEN3_MOE_MATCHED if FLAGS.preset == "qwen3_moe_matched" else presets.get(FLAGS.preset)
    cfg = dataclasses.replace(base, moe_impl="capacity")
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
                               InferencePrecision(FLAGS.engine_dtype),
                               moe_impl=FLAGS.engine_moe_impl)
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
    step = jax.jit(rl_step.make_rl_train_step(
        model, tx, losses.LossConfig(), logprob_chunk=64,
        logp_old_from_update=FLAGS.logp_old_from_update))
    step_flops = FLAGS.batch_size * max_len * train_flops_per_token(cfg, max_len)
    matmul, matmul_flops = peak_matmul(step_flops)
    logprob = jax.jit(rl_step.make_logprob_fn(model, chunk_size=64, router_replay=False))
    ckpt = checkpoint.Checkpointer(tempfile.mkdtemp(), checkpoint.CheckpointConfig(
        async_save=False, max_to_keep=1))

    phases = {k: [] for k in ("rollout", "reward", "logprob", "update", "weight_sync",
                              "checkpoint", "total")}
    tokens, mfu = [], []
    for it in range(FLAGS.iters + 1):
        t_start = time.perf_counter()
        reward_seconds[0] = 0.0
        batch, t_rollout = _timed(sched.next_batch)
        t_reward = reward_seconds[0]
        _, t_logprob = _timed(lambda: logprob(state["params"], state["router"], batch))
        _, t_peak = _timed(matmul)
        (state, _), t_step = _timed(lambda: step(state, batch))
        variables = {"params": state["params"], "router": state["router"]}
        _, t_sync = _timed(lambda: (engine.load_weights(variables, it + 1), engine.variables)[1])
        t0 = time.perf_counter()
        ckpt.save(it + 1, state=state, arrays=sched.state_dict())
        ckpt.wait()
        t_ckpt = time.perf_counter() - t0
        sched.update_weights(variables, it + 1)
        # The standalone log-prob and matmul timings are measurements, not the iteration.
        total = time.perf_counter() - t_start - t_logprob - t_peak
        if it == 0:
            continue  # compiles
        # Without the recompute the step holds no θ_old forward: all of it is the update.
        t_update = t_step if FLAGS.logp_old_from_update else t_step - t_logprob
        mfu.append((step_flops / t_step) / (matmul_flops / t_peak))
        for k, v in (("rollout", t_rollout), ("reward", t_reward),
                     ("logprob", 0.0 if FLAGS.logp_old_from_update else t_logprob),
                     ("update", t_update), ("weight_sync", t_sync),
                     ("checkpoint", t_ckpt), ("total", total)):
            phases[k].append(v)
        tokens.append(float(batch["loss_mask_BT"].sum()))
    sched.close()
    ckpt.close()

    med = {k: float(np.median(v)) for k, v in phases.items()}
    print(f"preset={FLAGS.preset} ({presets.param_count(cfg)[0] / 1e6:.1f}M params) "
          f"B={FLAGS.batch_size} G={FLAGS.group_size} new_tokens={FLAGS.new_tokens} "
          f"iters={FLAGS.iters} engine={FLAGS.engine_moe_impl}/{FLAGS.engine_dtype} "
          f"logp_old_from_update={FLAGS.logp_old_from_update} (median seconds)")
    for k, v in med.items():
        note = "  (inside rollout)" if k == "reward" else ""
        print(f"  {k:12s} {v:8.3f} s  {100 * v / med['total']:5.1f}%{note}")
    print(f"  trained response tokens/s (whole iteration): "
          f"{np.median(tokens) / med['total']:.1f}")
    no_ckpt = float(np.median(np.subtract(phases["total"], phases["checkpoint"])))
    print(f"  iteration without the checkpoint (issue 16's comparison): {no_ckpt:.3f} s")
    print(f"  train step MFU (PaLM FLOPs {step_flops / 1e9:.1f} GFLOP vs f32 matmul peak, "
          f"same run): {np.median(mfu):.1%}")


if __name__ == "__main__":
    app.run(main)
