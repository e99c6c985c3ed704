"""C3PO++ vs the synchronous baseline (and k-step async): time per trained token, side by side.

Long-tailed response-length mix (most responses short, a few 6-8x longer): the synchronous
baseline waits for the longest response of each batch while most slots idle; C3PO++ spends a
token budget Φ per iteration and carries unfinished responses over (PAPER §2, reported ~2.5×
rollout, ~1.5× end to end).

Two engines:
  --engine=fake  (default) `FakeEngine` with SIMULATED device time: ``--decode_ms`` per decode
                 step (batch-size independent, as on an accelerator), ``--prefill_us`` per
                 (re-)prefilled token, and a simulated train step of ``--train_ms_per_ktok`` per
                 1k row tokens (B·T). The trainer sleeps, so async overlap is as on separate
                 rollout and training devices. Also sweeps Φ and σ_max.
  --engine=real  the rollout engine on the ``--model`` preset (random weights; lengths 85%
                 U[12,20], 15% U[96,128], scripted via max_new_tokens), its prefill bucket grid
                 compiled before anything is timed (`EngineConfig.warmup_buckets`), refills
                 gathered ``--refill_min_rows`` at a time (also the smallest row bucket), a real jitted policy-gradient train
                 step with SGD, weights synced to the engine every step. Arms: sync, async k=1,
                 c3po (σ_max purge) and paced (admission paced, nothing purged). On the shared
                 2-core CPU trainer and engine compete for the same cores, so async cannot
                 overlap there.

  --calibrate    (with --engine=real) first measures, on this machine with the real engine, the
                 seconds per decode step (all slots busy), per prefill call and per prefilled
                 token (a least-squares fit over the bucket grid), prints the re-prefill-token /
                 decode-step ratio and the mismatch stale KV adds (``stale_kv``: |Δlogp| of
                 tokens generated after a real train step, vs the trainer's recompute), then
                 runs the same arms on `FakeEngine` with those costs and the measured train
                 step: real and calibrated-simulation figures side by side, and the share of a
                 sync step rollout must have for the measured rollout speed-up to give 1.5× end
                 to end.

  python experiments/benchmarks/c3po.py
  nice -n 5 python experiments/benchmarks/c3po.py --engine=real --calibrate

Prints, per run: rollout-phase seconds and end-to-end seconds per 1k trained response tokens,
their speedups over sync, purged fraction, mean trained response length (a budget that purges
long responses would shorten it: a bias, not a speedup), versions spanned per response.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
from absl import app, flags

from ring_jax.rollout.types import Request, SamplingParams
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
flags.DEFINE_string("model", "tiny", "real: model preset")
flags.DEFINE_integer("refill_min_rows", 4, "real: EngineConfig.refill_min_rows")
flags.DEFINE_bool("calibrate", False, "real: measure costs, print the calibrated simulation")

TARGET_E2E = 1.5  # the paper's end-to-end claim


def length_mix(short, long, long_frac):
    """Long-tailed mix: 1 - long_frac uniform in ``short``, long_frac uniform in ``long``."""
    def length(request):
        rng = np.random.default_rng(request.seed)
        lo, hi = long if rng.random() < long_frac else short
        return int(rng.integers(lo, hi + 1))
    return length


def reward(record, request):
    return float(request.tokens[-1] % 2), {}


def run(config, make_engine, train_step, num_prompts, warmup_batches=None, num_batches=None,
        prompt_len=(8, 24)):
    """Trains ``warmup_batches + num_batches`` batches (default: the flags'); returns timing
    and schedule statistics of the last ``num_batches``."""
    warmup_batches = FLAGS.warmup_batches if warmup_batches is None else warmup_batches
    num_batches = FLAGS.num_batches if num_batches is None else num_batches
    engine = make_engine()
    prompts = testing.prompt_records(num_prompts, seed=1, min_len=prompt_len[0],
                                     max_len=prompt_len[1], vocab_size=500)
    trained_tokens, lengths, spanned, rollout_s = 0, [], [], 0.0
    with Scheduler(config, engine, prompts, reward, testing.grpo_advantages) as sched:
        for i in range(warmup_batches + num_batches):
            if i == warmup_batches:
                sched.pop_metrics()
                start = time.perf_counter()
            batch = sched.next_batch()
            params = train_step(batch, sched.version)
            sched.update_weights(params, sched.version + 1)
            if i >= warmup_batches:
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
                share=rollout_s / wall, purged=purged / max(admitted, 1),
                mean_len=float(np.mean(lengths)), spanned=float(np.mean(spanned)),
                max_spanned=int(np.max(spanned)))


def report(rows, only_last=False):
    base = rows[0][1]
    if not only_last:
        print(f"{'run':44s} {'rollout s/ktok':>14s} {'x sync':>7s} {'e2e s/ktok':>11s} "
              f"{'x sync':>7s} {'purged':>7s} {'mean len':>9s} {'versions':>9s}")
    for name, r in rows[-1:] if only_last else rows:
        print(f"{name:44s} {r['rollout']:14.3f} {base['rollout'] / r['rollout']:7.2f} "
              f"{r['e2e']:11.3f} {base['e2e'] / r['e2e']:7.2f} {100 * r['purged']:6.1f}% "
              f"{r['mean_len']:9.1f} {r['spanned']:5.2f}/{r['max_spanned']}", flush=True)


def share_needed(rollout_speedup, e2e_speedup=TARGET_E2E):
    """Rollout's share r of a sync step for which a rollout phase ``rollout_speedup``× faster
    gives ``e2e_speedup``× end to end (Amdahl: 1 / (1 - r + r / s) = e), or None if none."""
    if rollout_speedup <= 1:
        return None
    r = (1 - 1 / e2e_speedup) / (1 - 1 / rollout_speedup)
    return r if r <= 1 else None


def arms(base, batch_tokens, sigma_max):
    """The compared scheduler configs: sync, async, C3PO++ with σ_max purge, paced."""
    def variant(**kw):
        return dataclasses.replace(base, **kw)
    c3po = dict(token_budget=batch_tokens, sigma_max=sigma_max)
    return [("sync", variant(mode="sync")),
            ("async k=1", variant(mode="async", max_staleness=1)),
            (f"c3po Φ={batch_tokens} σ_max={sigma_max}", variant(mode="c3po", **c3po)),
            (f"paced Φ={batch_tokens} σ_max={sigma_max}", variant(mode="paced", **c3po))]


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


def fake_main(num_prompts):
    base, make_engine, train_step, batch_tokens = fake_setup()
    runs = arms(base, batch_tokens, 4)[:3]
    if FLAGS.sweep:
        for phi in (batch_tokens // 2, 2 * batch_tokens):
            runs.append((f"c3po Φ={phi} σ_max=4", dataclasses.replace(
                base, mode="c3po", token_budget=phi, sigma_max=4)))
        for sigma in (1, 2, 8):
            runs.append((f"c3po Φ={batch_tokens} σ_max={sigma}", dataclasses.replace(
                base, mode="c3po", token_budget=batch_tokens, sigma_max=sigma)))
    rows = []
    for name, config in runs:
        rows.append((name, run(config, make_engine, train_step, num_prompts)))
        report(rows, only_last=len(rows) > 1)
    return rows


# ------------------------------------------------------------------------- real engine

@dataclasses.dataclass(frozen=True)
class RealSize:
    """The shapes of a real-engine benchmark. The default is this CPU's (``--engine=real``);
    `experiments/benchmarks/c3po_gpu.py` has an accelerator's and a tiny one."""

    model: str = "tiny"  # a `ring_jax.model.presets` name ...
    model_overrides: tuple[tuple[str, object], ...] = ()  # ... with these fields replaced
    dtype: str = "float32"  # engine inference dtype; also the trainer's params and compute
    moe_impl: str = "capacity"  # engine and trainer MoE dispatch (both dropless here)
    num_slots: int = 16
    group_size: int = 4
    batch_size: int = 16  # rows per trained batch
    prompt_len: tuple[int, int] = (8, 24)
    short: tuple[int, int] = (12, 20)  # response lengths: 1 - long_frac uniform in short,
    long: tuple[int, int] = (96, 128)  # long_frac uniform in long (6-8× short)
    long_frac: float = 0.15
    decode_chunk: int = 16
    min_prefill_len: int = 64
    refill_min_rows: int = 4  # EngineConfig.refill_min_rows = min_prefill_rows
    step_chunk_tokens: int = 256
    learning_rate: float = 1e-3  # the SGD train step's

    @property
    def max_new(self) -> int:
        return self.long[1]

    @property
    def max_seq_len(self) -> int:
        return self.prompt_len[1] + self.max_new

    def mean_response_len(self) -> float:
        return ((1 - self.long_frac) * np.mean(self.short) + self.long_frac * np.mean(self.long))


class RealBench:
    """The real engine, model and train step shared by every real arm (compiled once)."""

    def __init__(self, size: RealSize):
        import jax
        import jax.numpy as jnp
        import optax

        from ring_jax.model import Transformer, presets
        from ring_jax.rollout.engine import Engine, EngineConfig
        from ring_jax.rollout.precision import InferencePrecision

        self.size = size
        self.model_cfg = presets.get(size.model, **dict(size.model_overrides),
                                     param_dtype=size.dtype, dtype=size.dtype,
                                     moe_impl=size.moe_impl)
        model = Transformer(self.model_cfg)
        self.config = SchedulerConfig(
            mode="sync", group_size=size.group_size, batch_size=size.batch_size,
            max_seq_len=size.max_seq_len, sampling=SamplingParams(max_new_tokens=size.max_new),
            max_active_requests=2 * size.num_slots, step_chunk_tokens=size.step_chunk_tokens,
            num_reward_workers=2, max_staleness=1)
        self.lengths = length_mix(size.short, size.long, size.long_frac)
        # Jitted: an eager init dispatches (and compiles) every initializer op one by one.
        self.variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))

        @jax.jit
        def sgd_step(variables, batch):
            def loss_fn(params):
                logits_BTV, _ = model.apply({**variables, "params": params}, batch["tokens_BT"])
                logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32))
                logp_BT = jnp.take_along_axis(logp_BTV, batch["targets_BT"][..., None],
                                              -1)[..., 0]
                weight_BT = batch["loss_mask_BT"] * batch["advantages_B"][:, None]
                return -jnp.sum(logp_BT * weight_BT) / jnp.maximum(batch["loss_mask_BT"].sum(),
                                                                   1)
            grads = jax.grad(loss_fn)(variables["params"])
            params = optax.apply_updates(
                variables["params"],
                jax.tree.map(lambda g: (-size.learning_rate * g).astype(g.dtype), grads))
            return {**variables, "params": params}

        self.state = {"variables": self.variables}
        keys = ("tokens_BT", "targets_BT", "loss_mask_BT", "advantages_B")

        def train_step(batch, version):
            self.state["variables"] = jax.block_until_ready(
                sgd_step(self.state["variables"], {k: batch[k] for k in keys}))
            return self.state["variables"]

        self.train_step = train_step
        engine_config = EngineConfig(num_slots=size.num_slots, max_len=self.config.max_seq_len,
                                     decode_chunk=size.decode_chunk,
                                     min_prefill_len=min(size.min_prefill_len,
                                                         self.config.max_seq_len),
                                     min_prefill_rows=size.refill_min_rows,
                                     refill_min_rows=size.refill_min_rows,
                                     warmup_buckets=True)
        self.engine_config = engine_config
        self.precision = InferencePrecision(dtype=size.dtype)
        start = time.perf_counter()
        # One engine for every run, so its compiled programs are reused; each run starts it
        # from the initial weights at version 0.
        self.engine = Engine.from_model(self.model_cfg, self.variables, engine_config,
                                        self.precision, moe_impl=size.moe_impl)
        self.warmup_s = time.perf_counter() - start
        self.batch_tokens = int(size.batch_size * size.mean_response_len())
        self.platform = jax.devices()[0].platform
        print(f"# REAL engine, `{size.model}` model{' (resized)' if size.model_overrides else ''}"
              f" ({self.platform}, {size.dtype}, moe_impl={size.moe_impl}), {size.num_slots} "
              f"slots, refill_min_rows=min_prefill_rows={size.refill_min_rows}, "
              f"B={size.batch_size} rows (G={size.group_size}), T={self.config.max_seq_len}; "
              f"lengths {100 * (1 - size.long_frac):.0f}% U{list(size.short)}, "
              f"{100 * size.long_frac:.0f}% U{list(size.long)}; real jitted train step (SGD); "
              f"≈{self.batch_tokens} response tokens per batch; warm-up "
              f"({len(engine_config.prefill_buckets())} prefill buckets + decode) "
              f"{self.warmup_s:.1f} s, not timed", flush=True)

    def make_engine(self):
        self.state["variables"] = self.variables
        self.engine.drain()
        self.engine.load_weights(self.variables, 0)
        return testing.ScriptedLengthEngine(self.engine, self.lengths)

    # ------------------------------------------------------------------ calibration

    def _requests(self, n, prompt_len, max_new, prefix):
        rng = np.random.default_rng(prompt_len)
        return [Request(f"{prefix}{i}", rng.integers(1, 500, prompt_len).astype(np.int32),
                        SamplingParams(max_new_tokens=max_new, min_new_tokens=max_new),
                        seed=i) for i in range(n)]

    def calibrate(self, repeats=3):
        """Measured seconds per decode step (all slots busy), per prefill call and per
        prefilled (padded) token."""
        engine = self.make_engine()._engine
        engine.pop_stats()
        slots = self.size.num_slots
        engine.add(self._requests(slots, 16, 100, "d"))
        engine.step(token_budget=slots)  # the prefill
        engine.pop_stats()
        engine.step(token_budget=slots * 64)
        stats = engine.pop_stats()
        decode_step_s = stats["decode_s"] / stats["decode_steps"]
        engine.drain()
        xs, ys = [], []
        for N, T in self.engine_config.prefill_buckets():
            for _ in range(repeats):
                engine.add(self._requests(N, T - 1, 2, "p"))
                engine.step(token_budget=N)  # prefill only: N first tokens reach the budget
                engine.drain()
                stats = engine.pop_stats()
                xs.append(stats["prefill_padded_tokens"])
                ys.append(stats["prefill_s"])
        A = np.stack([np.ones(len(xs)), np.asarray(xs, np.float64)], 1)
        (call_s, token_s), *_ = np.linalg.lstsq(A, np.asarray(ys), rcond=None)
        return dict(decode_step_s=decode_step_s, prefill_call_s=max(float(call_s), 0.0),
                    prefill_token_s=max(float(token_s), 0.0))

    def random_batch(self):
        """A full batch of random tokens with ±1 advantages (the train step's input shapes)."""
        rng = np.random.default_rng(0)
        B = self.size.batch_size
        tokens_BT = rng.integers(1, 500, (B, self.config.max_seq_len)).astype(np.int32)
        return dict(tokens_BT=tokens_BT, targets_BT=np.roll(tokens_BT, -1, 1),
                    loss_mask_BT=np.ones(tokens_BT.shape, np.float32),
                    advantages_B=rng.choice([-1.0, 1.0], B).astype(np.float32))

    def train_step_s(self, repeats=3):
        batch = self.random_batch()
        self.train_step(batch, 0)
        start = time.perf_counter()
        for _ in range(repeats):
            self.train_step(batch, 0)
        self.state["variables"] = self.variables
        return (time.perf_counter() - start) / repeats

    def stale_kv_mismatch(self):
        """Mean / max |Δlogp| between an engine's log-probs of the tokens it generated after
        a real train step and the trainer's recompute under the new weights: re-prefilled
        (the default) vs stale KV. Uses a second engine (stale_kv=True, compiles on demand)."""
        import jax
        import jax.numpy as jnp

        from ring_jax.model import Transformer
        from ring_jax.rollout.engine import Engine

        model = Transformer(self.model_cfg)
        T = self.config.max_seq_len

        @jax.jit
        def logp_T(variables, tokens_1T):
            logits_1TV, _ = model.apply(variables, tokens_1T)
            logp_TV = jax.nn.log_softmax(logits_1TV[0].astype(jnp.float32))
            return jnp.take_along_axis(logp_TV[:-1], tokens_1T[0, 1:, None], -1)[:, 0]

        # The benchmark's own update size: one of its SGD steps (on a random batch).
        self.state["variables"] = self.variables
        new_variables = self.train_step(self.random_batch(), 0)
        requests = self._requests(8, 16, 96, "m")
        gaps = {}
        for stale in (False, True):
            config = dataclasses.replace(self.engine_config, stale_kv=stale,
                                         warmup_buckets=False)
            engine = (self.engine if not stale else Engine.from_model(
                self.model_cfg, self.variables, config, self.precision,
                moe_impl=self.size.moe_impl))
            engine.drain()
            engine.load_weights(self.variables, 0)
            engine.add([dataclasses.replace(r) for r in requests])
            engine.step(token_budget=8 * 32)
            engine.load_weights(new_variables, 1)
            done = []
            while True:
                out = engine.step()
                done += out.finished
                if not out.num_in_flight:
                    break
            gap = []
            for r in done:
                seq = np.zeros((1, T), np.int32)
                full = np.concatenate([r.prompt_tokens, r.tokens])
                seq[0, :len(full)] = full
                P = len(r.prompt_tokens)
                recompute = np.asarray(logp_T(new_variables, seq))[P - 1:len(full) - 1]
                after = r.versions == 1
                gap.append(np.abs(r.logprobs[after] - recompute[after]))
            gaps[stale] = np.concatenate(gap)
        self.state["variables"] = self.variables
        return gaps


def real_main(num_prompts):
    bench = RealBench(RealSize(model=FLAGS.model, refill_min_rows=FLAGS.refill_min_rows))
    costs = None
    if FLAGS.calibrate:
        costs = bench.calibrate()
        train_s = bench.train_step_s()
        ratio = costs["prefill_token_s"] / costs["decode_step_s"]
        print(f"# measured: decode step ({bench.size.num_slots} slots busy) "
              f"{1e3 * costs['decode_step_s']:.2f} ms; prefill "
              f"{1e3 * costs['prefill_call_s']:.2f} ms per call + "
              f"{1e6 * costs['prefill_token_s']:.1f} µs per token; train step "
              f"{1e3 * train_s:.1f} ms", flush=True)
        print(f"# re-prefill cost per token / one decode step = {ratio:.4f} (one decode step "
              f"costs as much as re-prefilling {1 / max(ratio, 1e-12):.0f} tokens)", flush=True)
        gaps = bench.stale_kv_mismatch()
        print(f"# |Δlogp| after a train step vs recompute: re-prefill mean "
              f"{gaps[False].mean():.2e} max {gaps[False].max():.2e}; stale KV mean "
              f"{gaps[True].mean():.2e} max {gaps[True].max():.2e} "
              f"({len(gaps[True])} tokens)", flush=True)
    runs = arms(bench.config, bench.batch_tokens, 4)
    rows = []
    for name, config in runs:
        rows.append((name, run(config, bench.make_engine, bench.train_step, num_prompts)))
        report(rows, only_last=len(rows) > 1)
    if costs is None:
        return rows, None

    def make_fake():
        return testing.FakeEngine(bench.size.num_slots, bench.lengths, vocab_size=500,
                                  refill_min_rows=FLAGS.refill_min_rows, **costs)

    def fake_train(batch, version):
        time.sleep(train_s)

    print("# calibrated simulation (FakeEngine with the measured costs, sleeping train step)")
    sim = []
    for name, config in runs:
        sim.append((name, run(config, make_fake, fake_train, num_prompts)))
        report(sim, only_last=len(sim) > 1)
    return rows, sim


def main(argv):
    del argv
    num_prompts = (FLAGS.warmup_batches + FLAGS.num_batches + 8) * 64
    if FLAGS.engine == "fake":
        rows, sim = fake_main(num_prompts), None
    else:
        rows, sim = real_main(num_prompts)
    print(f"\n# summary ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}), "
          f"{FLAGS.num_batches} measured batches after {FLAGS.warmup_batches} warm-up")
    report(rows)
    if sim is None:
        return
    print(f"\n{'run':44s} {'real rollout x':>14s} {'sim rollout x':>14s} {'real e2e x':>11s} "
          f"{'sim e2e x':>10s} {'real share':>10s} {'sim share':>10s}")
    for (name, r), (_, s) in zip(rows, sim):
        print(f"{name:44s} {rows[0][1]['rollout'] / r['rollout']:14.2f} "
              f"{sim[0][1]['rollout'] / s['rollout']:14.2f} {rows[0][1]['e2e'] / r['e2e']:11.2f} "
              f"{sim[0][1]['e2e'] / s['e2e']:10.2f} {100 * r['share']:9.0f}% "
              f"{100 * s['share']:9.0f}%")
    for label, table in (("real", rows), ("sim", sim)):
        speedup = max(table[0][1]["rollout"] / r["rollout"] for _, r in table[2:])
        need = share_needed(speedup)
        print(f"# {label}: best C3PO++ rollout speed-up {speedup:.2f}× → {TARGET_E2E}× end to "
              "end needs rollout to be "
              + (f"≥ {100 * need:.0f}% of a sync step" if need is not None else "impossible")
              + f" (sync's share here: {100 * table[0][1]['share']:.0f}%)")


if __name__ == "__main__":
    app.run(main)
