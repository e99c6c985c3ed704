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

``--peer=tunix`` (needs google-tunix 0.1.7, the ``[peer]`` extra, best in a virtualenv of its
own) times issue 16's comparison instead: this iteration without its checkpoint (rollout,
train step, weight sync) against Tunix's `GRPOLearner` on its Qwen3 MoE of the same shape
(`rl_step_tunix.py`: what it builds, what it measures), interleaved in one process — ``--warmup``
iterations of each, then ``--iters`` pairs (ring_jax, then Tunix) — printing each pair's
Tunix / ring_jax ratio, their median and both sides' time breakdown. It first checks that both
sides did the same work (trained tokens, optimizer updates) and prints the dtypes and prompt
lengths; it needs ``--engine_dtype=float32 --logp_old_from_update`` (Tunix rolls out with its
f32 actor and runs no θ_old forward at num_iterations = 1):

    PYTHONPATH=. python experiments/benchmarks/rl_step.py --peer=tunix --preset=qwen3_moe_matched --engine_dtype=float32 --logp_old_from_update --iters=4
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
flags.DEFINE_integer("iters", 3, "measured iterations (after one warm-up), or pairs with --peer")
flags.DEFINE_string("peer", "", "'tunix': time Tunix's GRPOLearner on the same shape, "
                    "interleaved (needs google-tunix, the [peer] extra)")
flags.DEFINE_integer("warmup", 2, "--peer: warm-up iterations of each side (not timed)")

PROMPT_LEN = 32  # the prompt budget: max_len = PROMPT_LEN + new_tokens


def _timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """PaLM's model FLOPs of one trained token (forward + backward): 6·N_active plus the
    attention scores and values 12·L·H·Q·T."""
    _, active = presets.param_count(cfg)
    return 6 * active + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


class RingJaxIteration:
    """ring_jax's RL iteration (`ring_jax/train/rl_loop.py`'s order: rollout -> train step ->
    weight sync [-> checkpoint]) on `cfg`, each phase timed; `run` does one."""

    def __init__(self, cfg: ModelConfig, tx, *, checkpoint_dir: str | None):
        self.cfg = cfg
        model = Transformer(cfg)
        tok = get_tokenizer("byte")
        task = tasks.get("addition", min_size=2, max_size=3)
        self.max_len = PROMPT_LEN + FLAGS.new_tokens
        sampling = SamplingParams(max_new_tokens=FLAGS.new_tokens,
                                  min_new_tokens=FLAGS.new_tokens, stop_token_ids=(tok.eos_id,))
        sched_cfg = SchedulerConfig(mode="sync", group_size=FLAGS.group_size,
                                    batch_size=FLAGS.batch_size, max_seq_len=self.max_len,
                                    sampling=sampling, num_reward_workers=2)
        variables = jax.jit(model.init)(jax.random.key(0),
                                        jnp.zeros((1, self.max_len), jnp.int32))
        self.state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
                      "opt_state": tx.init(variables["params"]), "router": variables["router"]}
        self.engine = Engine.from_model(cfg, variables, EngineConfig(
            num_slots=FLAGS.batch_size, max_len=self.max_len, decode_chunk=16),
            InferencePrecision(FLAGS.engine_dtype), moe_impl=FLAGS.engine_moe_impl)
        score = rewards.make_reward_fn(rewards.RewardConfig(), task, tok)
        self.reward_seconds = 0.0

        def reward_fn(record, response_tokens, finish_reason):
            t0 = time.perf_counter()
            out = score(record, response_tokens, finish_reason)
            self.reward_seconds += time.perf_counter() - t0  # GIL-atomic enough here
            return out

        adv_cfg = advantages.AdvantageConfig()
        self.sched = Scheduler(
            sched_cfg, self.engine,
            pipeline.prompt_iterator(pipeline.prompt_dataset(task, tok, num_epochs=None,
                                                             num_prompts=10_000)),
            reward_fn=lambda rec, req: reward_fn(rec, req.tokens, req.finish_reason),
            advantage_fn=lambda r: np.asarray(advantages.compute_advantages(
                jnp.asarray(r)[None], adv_cfg).advantages[0]))
        self.loss_cfg = losses.LossConfig()
        self.step = jax.jit(rl_step.make_rl_train_step(
            model, tx, self.loss_cfg, logprob_chunk=64,
            logp_old_from_update=FLAGS.logp_old_from_update))
        self.step_flops = FLAGS.batch_size * self.max_len * train_flops_per_token(
            cfg, self.max_len)
        self.matmul, self.matmul_flops = peak_matmul(self.step_flops)
        self.logprob = jax.jit(rl_step.make_logprob_fn(model, chunk_size=64,
                                                       router_replay=False))
        self.ckpt = None if checkpoint_dir is None else checkpoint.Checkpointer(
            checkpoint_dir, checkpoint.CheckpointConfig(async_save=False, max_to_keep=1))

    def run(self, it: int, *, measure: bool) -> dict[str, float]:
        """One iteration; returns each phase's seconds, ``total``, the trained ``tokens``, the
        ``updates`` applied, ``prompt_len`` (mean) and, with `measure`, the train step's
        ``mfu`` (then the θ_old forward and a matmul are timed alone too, outside ``total``)."""
        out = {}
        t_start = time.perf_counter()
        self.reward_seconds = 0.0
        batch, out["rollout"] = _timed(self.sched.next_batch)
        out["reward"] = self.reward_seconds
        t_logprob = t_peak = 0.0
        if measure:
            _, t_logprob = _timed(lambda: self.logprob(self.state["params"],
                                                       self.state["router"], batch))
            _, t_peak = _timed(self.matmul)
        step_before = int(self.state["step"])
        (self.state, _), t_step = _timed(lambda: self.step(self.state, batch))
        variables = {"params": self.state["params"], "router": self.state["router"]}
        _, out["weight_sync"] = _timed(
            lambda: (self.engine.load_weights(variables, it + 1), self.engine.variables)[1])
        out["checkpoint"] = 0.0
        if self.ckpt is not None:
            t0 = time.perf_counter()
            self.ckpt.save(it + 1, state=self.state, arrays=self.sched.state_dict())
            self.ckpt.wait()
            out["checkpoint"] = time.perf_counter() - t0
        self.sched.update_weights(variables, it + 1)
        # The standalone log-prob and matmul timings are measurements, not the iteration.
        out["total"] = time.perf_counter() - t_start - t_logprob - t_peak
        # Without the recompute the step holds no θ_old forward: all of it is the update.
        out["logprob"] = 0.0 if FLAGS.logp_old_from_update else t_logprob
        out["update"] = t_step - out["logprob"]
        if measure:
            out["mfu"] = (self.step_flops / t_step) / (self.matmul_flops / t_peak)
        out["tokens"] = float(batch["loss_mask_BT"].sum())
        out["updates"] = int(self.state["step"]) - step_before
        # Targets are shifted by one: the first response token is target index prompt_len - 1.
        out["prompt_len"] = float(np.mean(np.argmax(np.asarray(batch["loss_mask_BT"]), 1) + 1))
        return out

    def close(self):
        self.sched.close()
        if self.ckpt is not None:
            self.ckpt.close()


def _config() -> ModelConfig:
    base = QWEN3_MOE_MATCHED if FLAGS.preset == "qwen3_moe_matched" else presets.get(FLAGS.preset)
    return dataclasses.replace(base, moe_impl="capacity")


def main(_):
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if FLAGS.peer:
        return run_peer()
    cfg = _config()
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-5))
    ring = RingJaxIteration(cfg, tx, checkpoint_dir=tempfile.mkdtemp())
    runs = [ring.run(it, measure=True) for it in range(FLAGS.iters + 1)][1:]  # 0: compiles
    ring.close()

    phases = ("rollout", "reward", "logprob", "update", "weight_sync", "checkpoint", "total")
    med = {k: float(np.median([r[k] for r in runs])) for k in phases}
    print(f"preset={FLAGS.preset} ({presets.param_count(cfg)[0] / 1e6:.1f}M params) "
          f"B={FLAGS.batch_size} G={FLAGS.group_size} new_tokens={FLAGS.new_tokens} "
          f"iters={FLAGS.iters} engine={FLAGS.engine_moe_impl}/{FLAGS.engine_dtype} "
          f"logp_old_from_update={FLAGS.logp_old_from_update} (median seconds)")
    for k, v in med.items():
        note = "  (inside rollout)" if k == "reward" else ""
        print(f"  {k:12s} {v:8.3f} s  {100 * v / med['total']:5.1f}%{note}")
    print(f"  trained response tokens/s (whole iteration): "
          f"{np.median([r['tokens'] for r in runs]) / med['total']:.1f}")
    no_ckpt = float(np.median([r["total"] - r["checkpoint"] for r in runs]))
    print(f"  iteration without the checkpoint (issue 16's comparison): {no_ckpt:.3f} s")
    print(f"  train step MFU (PaLM FLOPs {ring.step_flops / 1e9:.1f} GFLOP vs f32 matmul peak, "
          f"same run): {np.median([r['mfu'] for r in runs]):.1%}")


def run_peer():
    """``--peer=tunix``: ring_jax's iteration (no checkpoint) and Tunix's GRPOLearner on the
    same shape, interleaved in this process: ``--warmup`` iterations each, then ``--iters``
    pairs (ring_jax first), each pair's Tunix / ring_jax time ratio and their median."""
    if FLAGS.peer != "tunix":
        raise app.UsageError(f"--peer={FLAGS.peer!r}: allowed values are '' and 'tunix'")
    # Same work on both sides: Tunix's vanilla rollout shares the f32 actor, and with
    # num_iterations = 1 it runs no θ_old forward.
    if FLAGS.engine_dtype != "float32" or not FLAGS.logp_old_from_update:
        raise app.UsageError("--peer=tunix needs --engine_dtype=float32 and "
                             "--logp_old_from_update (Tunix rolls out with the f32 actor and "
                             "runs no θ_old forward at num_iterations=1)")
    if FLAGS.batch_size % FLAGS.group_size:
        raise app.UsageError(f"--batch_size={FLAGS.batch_size} must be a multiple of "
                             f"--group_size={FLAGS.group_size}")
    try:
        import rl_step_tunix  # noqa: PLC0415 -- optional: only this mode needs tunix
    except ModuleNotFoundError as e:
        raise app.UsageError(str(e)) from None
    cfg = _config()
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-5))
    peer = rl_step_tunix.TunixPeer(
        cfg, tx, num_prompts=FLAGS.batch_size // FLAGS.group_size, group_size=FLAGS.group_size,
        prompt_len=PROMPT_LEN, new_tokens=FLAGS.new_tokens,
        loss_aggregation=losses.LossConfig().aggregation)
    ring = RingJaxIteration(cfg, tx, checkpoint_dir=None)
    try:
        for it in range(FLAGS.warmup):  # compiles
            a, b = ring.run(it, measure=False), peer.run_iteration()
        print(f"preset={FLAGS.preset}: ring_jax {presets.param_count(cfg)[0] / 1e6:.2f}M params "
              f"vs Tunix {peer.num_params / 1e6:.2f}M; B={FLAGS.batch_size} "
              f"({FLAGS.batch_size // FLAGS.group_size} prompts x G={FLAGS.group_size}), "
              f"{FLAGS.new_tokens} new tokens forced")
        print(f"  same work (last warm-up iteration): trained tokens {a['tokens']:.0f} vs "
              f"{b.tokens} (= {b.rows} x {b.completion_len}); optimizer updates "
              f"{a['updates']} vs {b.updates}; dtype train/rollout float32/{FLAGS.engine_dtype} "
              f"vs {peer.param_dtype}/{peer.rollout_dtype}; prompt tokens {a['prompt_len']:.1f} "
              f"(mean) vs {b.prompt_len}; engine dispatch {FLAGS.engine_moe_impl} vs Tunix's "
              f"CPU path (every expert on every token)")
        if (a["tokens"], a["updates"]) != (b.tokens, b.updates):
            raise RuntimeError("the two sides did different work (tokens, updates): "
                               f"ring_jax {a['tokens'], a['updates']}, Tunix "
                               f"{b.tokens, b.updates}")
        pairs = []
        for i in range(FLAGS.iters):
            a = ring.run(FLAGS.warmup + i, measure=False)
            b = peer.run_iteration()
            pairs.append((a, b))
            print(f"  pair {i + 1}: ring_jax {a['total']:.3f} s, Tunix {b.total:.3f} s, "
                  f"Tunix / ring_jax = {b.total / a['total']:.2f}x", flush=True)
    finally:
        ring.close()
        peer.close()

    ratios = [b.total / a["total"] for a, b in pairs]
    print(f"  median Tunix / ring_jax over {len(pairs)} pairs: {np.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
    med_a = {k: float(np.median([a[k] for a, _ in pairs]))
             for k in ("rollout", "reward", "update", "weight_sync", "total")}
    med_b = {k: float(np.median([getattr(b, k) for _, b in pairs]))
             for k in ("rollout", "reward_advantage", "update", "total")}
    print("  ring_jax (median s): " + ", ".join(
        f"{k} {v:.3f}" + ("" if k in ("total", "reward") else f" ({v / med_a['total']:.0%})")
        for k, v in med_a.items()) + "  [reward runs inside rollout]")
    print("  Tunix    (median s): " + ", ".join(
        f"{k} {v:.3f}" + ("" if k == "total" else f" ({v / med_b['total']:.0%})")
        for k, v in med_b.items()))


if __name__ == "__main__":
    app.run(main)
