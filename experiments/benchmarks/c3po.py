"""C3PO++ vs the synchronous baseline (and k-step async): time per trained token, side by side.

Long-tailed response-length mix (most responses short, a few near the maximum): the synchronous
baseline waits for the longest response of each batch while most slots idle; C3PO++ spends a
token budget Φ per iteration and carries unfinished responses over (PAPER §2, reported ~2.5×
rollout, ~1.5× end to end).

Two engines:
  --engine=fake  (default) `FakeEngine` with SIMULATED device time: ``--decode_ms`` per decode
                 step (batch-size independent, as on an accelerator), ``--prefill_us`` per
                 (re-)prefilled token, and a simulated train step of ``--train_ms_per_ktok`` per
                 1k row tokens (B·T). The trainer sleeps, so async overlap is as on separate
                 rollout and training devices. Also sweeps Φ and σ_max.
  --engine=real  the rollout engine on the `small` model (random weights; lengths scripted via
                 max_new_tokens), a real jitted policy-gradient train step with SGD, weights
                 synced to the engine every step. On the shared 2-core CPU trainer and engine
                 compete for the same cores, so async cannot overlap there.

  python experiments/benchmarks/c3po.py
  python experiments/benchmarks/c3po.py --engine=real --num_batches=3

Prints, per run: rollout-phase seconds and end-to-end seconds per 1k trained response tokens,
their speedups over sync, purged fraction, mean trained response length (a budget that purges
long responses would shorten it: a bias, not a speedup), versions spanned per response.
"""
from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from ring_jax.rollout.types import SamplingParams
from ring_jax.scheduler import Scheduler, SchedulerConfig
from ring_jax.scheduler import testing

FLAGS = flags.FLAGS
flags.DEFINE_enum("engine", "fake", ["fake", "real"], "fake (simulated time) or real engine")
flags.DEFINE_integer("num_batches", 8, "measured batches per run")
flags.DEFINE_integer("warmup_batches", 2, "batches before measuring (ramp-up, compiles)")
flags.DEFINE_float("decode_ms", 2.0, "fake: simulated ms per decode step")
flags.DEFINE_float("prefill_us", 5.0, "fake: simulated µs per (re-)prefilled token")
flags.DEFINE_float("train_ms_per_ktok", 25.0, "fake: simulated train ms per 1k row tokens")
flags.DEFINE_bool("sweep", True, "fake: also sweep Φ and σ_max")


def length_mix(short, long, long_frac):
    """Long-tailed mix: 1 - long_frac uniform in ``short``, long_frac uniform in ``long``."""
    def length(request):
        rng = np.random.default_rng(request.seed)
        lo, hi = long if rng.random() < long_frac else short
        return int(rng.integers(lo, hi + 1))
    return length


def reward(record, request):
    return float(request.tokens[-1] % 2), {}


def run(config, make_engine, train_step, num_prompts):
    """Trains ``warmup + num_batches`` batches; returns timing and schedule statistics."""
    engine = make_engine()
    prompts = testing.prompt_records(num_prompts, seed=1, min_len=8, max_len=32, vocab_size=500)
    trained_tokens, lengths, spanned, rollout_s = 0, [], [], 0.0
    with Scheduler(config, engine, prompts, reward, testing.grpo_advantages) as sched:
        for i in range(FLAGS.warmup_batches + FLAGS.num_batches):
            if i == FLAGS.warmup_batches:
                sched.pop_metrics()
                start = time.perf_counter()
            batch = sched.next_batch()
            params = train_step(batch, sched.version)
            sched.update_weights(params, sched.version + 1)
            if i >= FLAGS.warmup_batches:
                mask = batch["loss_mask_BT"] > 0
                trained_tokens += int(mask.sum())
                lengths.extend(mask.sum(1)[batch["group_ids_B"] >= 0].tolist())
                for b in np.flatnonzero(batch["group_ids_B"] >= 0):
                    spanned.append(len(np.unique(batch["versions_BT"][b][mask[b]])))
                rollout_s += sched.pop_metrics().get("rollout/phase_s", 0.0)
        wall = time.perf_counter() - start
        totals = sched.pop_metrics()
    purged = totals.get("sched/total/purged_responses", 0.0)
    admitted = totals.get("sched/total/admitted_groups", 0.0) * config.group_size
    return dict(rollout=1e3 * rollout_s / trained_tokens, e2e=1e3 * wall / trained_tokens,
                purged=purged / max(admitted, 1), mean_len=float(np.mean(lengths)),
                spanned=float(np.mean(spanned)), max_spanned=int(np.max(spanned)))


def report(rows, only_last=False):
    base = rows[0][1]
    if not only_last:
        print(f"{'run':44s} {'rollout s/ktok':>14s} {'x sync':>7s} {'e2e s/ktok':>11s} "
              f"{'x sync':>7s} {'purged':>7s} {'mean len':>9s} {'versions':>9s}")
    for name, r in rows[-1:] if only_last else rows:
        print(f"{name:44s} {r['rollout']:14.3f} {base['rollout'] / r['rollout']:7.2f} "
              f"{r['e2e']:11.3f} {base['e2e'] / r['e2e']:7.2f} {100 * r['purged']:6.1f}% "
              f"{r['mean_len']:9.1f} {r['spanned']:5.2f}/{r['max_spanned']}", flush=True)


def fake_setup():
    num_slots, G, B = 32, 4, 32
    config = SchedulerConfig(
        mode="sync", group_size=G, batch_size=B, max_seq_len=32 + 512,
        sampling=SamplingParams(max_new_tokens=512), max_active_requests=2 * num_slots,
        step_chunk_tokens=512, num_reward_workers=4, max_staleness=1)
    lengths = length_mix((16, 96), (400, 600), 0.15)  # ~15% cut at 512 ("length")
    train_s = FLAGS.train_ms_per_ktok * 1e-3 * B * config.max_seq_len / 1e3

    def make_engine():
        return testing.FakeEngine(num_slots, lengths, vocab_size=500,
                                  decode_step_s=FLAGS.decode_ms * 1e-3,
                                  prefill_token_s=FLAGS.prefill_us * 1e-6)

    def train_step(batch, version):
        time.sleep(train_s)
        return None

    mean_len = 0.85 * 56 + 0.15 * (0.6 * 456 + 0.4 * 512)  # ≈ tokens per response
    batch_tokens = int(B * mean_len)
    print(f"# FAKE engine, SIMULATED device time: {num_slots} slots, decode step "
          f"{FLAGS.decode_ms} ms, prefill {FLAGS.prefill_us} µs/token, train step "
          f"{train_s:.3f} s; B={B} rows (G={G}), T={config.max_seq_len}; lengths 85% U[16,96], "
          f"15% U[400,600] cut at 512; ≈{batch_tokens} response tokens per batch")
    return config, make_engine, train_step, batch_tokens


def real_setup():
    import jax
    import jax.numpy as jnp
    import optax

    from ring_jax.model import Transformer, presets
    from ring_jax.rollout.engine import Engine, EngineConfig
    from ring_jax.rollout.precision import InferencePrecision

    num_slots, G, B, max_new = 16, 4, 16, 128
    model_cfg = presets.get("small")
    model = Transformer(model_cfg)
    config = SchedulerConfig(
        mode="sync", group_size=G, batch_size=B, max_seq_len=32 + max_new,
        sampling=SamplingParams(max_new_tokens=max_new), max_active_requests=2 * num_slots,
        step_chunk_tokens=256, num_reward_workers=2, max_staleness=1)
    lengths = length_mix((8, 32), (100, 128), 0.15)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))

    @jax.jit
    def sgd_step(variables, batch):
        def loss_fn(params):
            logits_BTV, _ = model.apply({**variables, "params": params}, batch["tokens_BT"])
            logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32))
            logp_BT = jnp.take_along_axis(logp_BTV, batch["targets_BT"][..., None], -1)[..., 0]
            weight_BT = batch["loss_mask_BT"] * batch["advantages_B"][:, None]
            return -jnp.sum(logp_BT * weight_BT) / jnp.maximum(batch["loss_mask_BT"].sum(), 1)
        grads = jax.grad(loss_fn)(variables["params"])
        params = optax.apply_updates(variables["params"],
                                     jax.tree.map(lambda g: -1e-4 * g, grads))
        return {**variables, "params": params}

    state = {"variables": variables}
    keys = ("tokens_BT", "targets_BT", "loss_mask_BT", "advantages_B")

    def train_step(batch, version):
        state["variables"] = jax.block_until_ready(
            sgd_step(state["variables"], {k: batch[k] for k in keys}))
        return state["variables"]

    # One engine for every run, so its compiled prefill / decode programs are reused; each
    # run starts it from the initial weights at version 0.
    engine = Engine.from_model(model_cfg, variables,
                               EngineConfig(num_slots=num_slots, max_len=config.max_seq_len,
                                            decode_chunk=16),
                               InferencePrecision(dtype="float32"), moe_impl="capacity")

    def make_engine():
        state["variables"] = variables
        engine.drain()
        engine.load_weights(variables, 0)
        return testing.ScriptedLengthEngine(engine, lengths)

    batch_tokens = int(B * (0.85 * 20 + 0.15 * 114))
    print(f"# REAL engine, `small` model ({jax.devices()[0].platform}), {num_slots} slots, "
          f"B={B} rows (G={G}), T={config.max_seq_len}; lengths 85% U[8,32], 15% U[100,128]; "
          f"real jitted train step (SGD); ≈{batch_tokens} response tokens per batch")
    return config, make_engine, train_step, batch_tokens


def main(argv):
    del argv
    setup = real_setup if FLAGS.engine == "real" else fake_setup
    base, make_engine, train_step, batch_tokens = setup()
    prompts_needed = (FLAGS.warmup_batches + FLAGS.num_batches + 8) * base.prompts_per_batch * 4

    def variant(**kw):
        import dataclasses
        return dataclasses.replace(base, **kw)

    runs = [("sync", variant(mode="sync")),
            ("async k=1", variant(mode="async", max_staleness=1)),
            (f"c3po Φ={batch_tokens} σ_max=4", variant(mode="c3po", token_budget=batch_tokens,
                                                      sigma_max=4))]
    if FLAGS.engine == "fake" and FLAGS.sweep:
        for phi in (batch_tokens // 2, 2 * batch_tokens):
            runs.append((f"c3po Φ={phi} σ_max=4", variant(mode="c3po", token_budget=phi,
                                                          sigma_max=4)))
        for sigma in (1, 2, 8):
            runs.append((f"c3po Φ={batch_tokens} σ_max={sigma}", variant(
                mode="c3po", token_budget=batch_tokens, sigma_max=sigma)))
    if FLAGS.engine == "real":
        # Compile every prefill bucket / decode / train program before anything is timed (a
        # c3po run re-prefills resumed requests at many lengths).
        print("# warm-up run (compiles), not reported", flush=True)
        run(runs[2][1], make_engine, train_step, prompts_needed)
    rows = []
    for name, config in runs:
        rows.append((name, run(config, make_engine, train_step, prompts_needed)))
        report(rows, only_last=len(rows) > 1)
    print(f"\n# summary ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}), "
          f"{FLAGS.num_batches} measured batches after {FLAGS.warmup_batches} warm-up")
    report(rows)


if __name__ == "__main__":
    app.run(main)
