"""The RL loop: SFT warm start, then GRPO + IcePop with the C3PO++ scheduler (PAPER §1-§3).

One controller (this Python process; one per host in a multi-host run) drives SPMD programs:

  setup      mesh, tokenizer, task, model, reward function
  SFT        Long-CoT SFT warm start on the task's worked solutions (`train/sft.py`), resumable;
             it starts from ``init_from`` when one is given (`train/init_from.py`)
  restore    the newest intact RL checkpoint (one consistent cut: train state + scheduler state,
             including unfinished rollouts and the prompt-iterator position), else initialise
             from the SFT stage / ``init_from`` (an SFT or RL workdir, or a local HF checkpoint
             directory) / scratch
  loop       rollout → reward (the scheduler: engine + reward workers, complete groups only,
             read as a grain dataset whose iterator state is the scheduler's checkpoint)
             → train (recompute log π_train(θ_old), minibatched policy-loss updates, router bias)
             → weight sync (published to the scheduler; the engine installs it at the next
               iteration boundary) → evaluation → metrics → checkpoint

Every policy version v is the number of RL steps taken; the engine stamps each token with it.
Resuming a killed run continues exactly as if it had not stopped (CPU): the scheduler's state is
restored at the same iteration boundary and every sampling seed is a function of that state.
Arrays cross between the training mesh, the engine and the host in `train/multihost.py`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ring_jax import sharding
from ring_jax.data import pipeline, rewards, tasks
from ring_jax.data.tokenizer import get_tokenizer
from ring_jax.model import Transformer
from ring_jax.rl import advantages as advantages_lib
from ring_jax.rollout.engine import Engine
from ring_jax.scheduler import Scheduler
from ring_jax.train import checkpoint as checkpoint_lib
from ring_jax.train import config_history, distributed, donation, evaluate, experiment, health
from ring_jax.train import init_from as init_from_lib
from ring_jax.train import multihost, optim, preemption, rl_step, sft
from ring_jax.train import metrics as metrics_lib

CONSOLE_FIELDS = {"reward": "rl/reward_mean", "eval": "eval/pass@1",
                  "|Δlogp|": "mismatch/abs_logp_diff_mean", "masked": "mismatch/masked_frac",
                  "tok/s": "perf/trained_tokens_per_s"}


def _eval_records(cfg: experiment.ExperimentConfig, task, tokenizer) -> list[dict[str, Any]]:
    """The fixed held-out evaluation set (`evaluate.eval_records`): the same for every seed."""
    return evaluate.eval_records(task, tokenizer, cfg.eval.num_prompts, cfg.task.thinking)


def policy_source(cfg, workdir: str) -> str:
    """Where a new RL run's policy comes from: the SFT stage when it ran (it started from
    ``init_from``), else ``init_from``; "" for a fresh init."""
    return os.path.join(workdir, "sft") if cfg.sft.num_steps else cfg.init_from


def _init_state(cfg, model, tx, mesh, workdir: str, load_policy: bool) -> dict:
    """Fresh RL state placed on the mesh, with the policy from SFT / ``init_from`` if any and
    ``load_policy`` (a resumed run restores its own checkpoint over this state instead). SFT
    itself started from ``init_from``, so with SFT steps the policy is the SFT result."""
    tokens = jnp.zeros((1, cfg.scheduler.max_seq_len), jnp.int32)
    with sharding.use_mesh(mesh):
        var_shardings = sharding.param_shardings(
            mesh, sharding.param_logical_axes(model, tokens))
        variables = jax.jit(model.init, out_shardings=var_shardings)(
            jax.random.key(cfg.seeds.init), tokens)
        policy_dir = policy_source(cfg, workdir)
        if policy_dir and load_policy:
            variables = init_from_lib.load_policy(policy_dir, cfg.model, variables)
        params = variables["params"]
        opt_shardings = sharding.optimizer_state_shardings(tx, params, var_shardings["params"],
                                                           mesh)
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": jax.jit(tx.init, out_shardings=opt_shardings)(params),
                "router": variables.get("router", {})}


def run(cfg: experiment.ExperimentConfig, workdir: str) -> dict[str, float]:
    """Runs (or resumes) the experiment in ``workdir``; returns the final evaluation.

    SIGTERM stops it after the step in progress with a checkpoint of that step
    (`preemption.Preempted`, exit code 75); rerunning the same command resumes.
    """
    with preemption.StopOnSignal() as stop:
        return _run(cfg, workdir, stop)


def _run(cfg: experiment.ExperimentConfig, workdir: str,
         stop: preemption.StopOnSignal) -> dict[str, float]:
    # ---------------------------------------------------------------- setup
    cfg = experiment.derive(cfg)  # seed streams, stop tokens, routing shape (config.json has them)
    init_from_lib.check_workdir(cfg.init_from, workdir, cfg.sft.num_steps)
    distributed.maybe_initialize()
    is_main = distributed.is_main()
    os.makedirs(workdir, exist_ok=True)
    # A resume refuses a config that changes what the checkpoints mean, before writing anything.
    config_history.record(workdir, experiment.to_dict(cfg), write=is_main)
    finished_at = _finished_step(cfg, workdir)
    if finished_at is not None:
        if is_main:
            print(f"{workdir}: already finished at step {finished_at} (rl.num_steps="
                  f"{cfg.rl.num_steps}); nothing to do", flush=True)
        return _final_eval(workdir, finished_at)
    mesh = sharding.make_mesh(**cfg.mesh.resolve(jax.device_count()),
                              allow_split_physical_axes=cfg.mesh.allow_split_physical_axes)
    tokenizer = get_tokenizer(cfg.task.tokenizer)
    task = tasks.get(cfg.task.name, **dict(cfg.task.kwargs))
    model = Transformer(cfg.model)
    sched_cfg = cfg.scheduler
    reward_fn = rewards.make_reward_fn(cfg.reward, task, tokenizer)

    # ---------------------------------------------------------------- SFT warm start
    if cfg.sft.num_steps:
        sft.train_sft(model, task, tokenizer, os.path.join(workdir, "sft"), cfg.sft,
                      cfg.sft_optim, cfg.checkpoint, rng=jax.random.key(cfg.seeds.init),
                      is_main=is_main, initial_policy=(
                          (lambda target: init_from_lib.load_policy(cfg.init_from, cfg.model,
                                                                    target))
                          if cfg.init_from else None),
                      stop=stop)

    # ---------------------------------------------------------------- restore or initialise
    tx = optim.make_optimizer(cfg.rl.optim)
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
    resuming = ckpt.latest_step() is not None
    state = _init_state(cfg, model, tx, mesh, workdir, load_policy=not resuming)
    start, sched_state = 0, None
    if resuming:
        restored = ckpt.restore(state)
        state, start, sched_state = restored.state, restored.step, restored.arrays

    variables = multihost.to_engine({"params": state["params"], "router": state["router"]},
                                   cfg.mesh.engine)
    if cfg.rl.donate_state:  # the first step deletes the state's buffers
        variables = donation.unaliased(variables, state)
    engine_kw = dict(precision=cfg.precision, version=start, moe_impl=cfg.engine_moe_impl,
                     mesh=multihost.engine_mesh(mesh, cfg.mesh.engine), detokenize=tokenizer.decode)
    engine = Engine.from_model(cfg.model, variables, cfg.engine, **engine_kw)
    # Between scheduler iterations the engine is idle (sync, c3po: unfinished responses wait in
    # the scheduler's buffer), so evaluation reuses it and its compiled programs; in async mode
    # the producer thread owns it, so evaluation gets its own.
    eval_engine = engine if cfg.scheduler.mode != "async" else Engine.from_model(
        cfg.model, variables, dataclasses.replace(cfg.engine, record_expert_ids=False),
        **engine_kw)
    # Greedy pass@1 on a float32 engine without mismatch knobs: a function of the policy alone.
    greedy_engine = None
    if cfg.eval.greedy_engine == "float32" and cfg.precision != evaluate.FP32_PRECISION:
        greedy_engine = Engine.from_model(
            cfg.model, variables, dataclasses.replace(cfg.engine, record_expert_ids=False),
            **{**engine_kw, "precision": evaluate.FP32_PRECISION})
    prompts = pipeline.prompt_iterator(pipeline.prompt_dataset(
        task, tokenizer, seed=cfg.seeds.prompts, num_epochs=None,
        num_prompts=cfg.task.num_prompts, thinking=cfg.task.thinking))
    group_advantages = jax.jit(lambda rewards_NG: advantages_lib.compute_advantages(
        rewards_NG, cfg.rl.advantage).advantages)
    advantage_fn = lambda rewards_G: np.asarray(group_advantages(
        np.asarray(rewards_G, np.float32)[None]))[0]
    scheduler = Scheduler(
        sched_cfg, engine, prompts,
        reward_fn=lambda record, request: reward_fn(record, request.tokens,
                                                    request.finish_reason),
        advantage_fn=advantage_fn)
    # Rollouts reach the trainer through grain; the iterator's state is the scheduler's cut.
    batches = iter(scheduler.as_dataset())
    if sched_state is not None:
        batches.set_state(sched_state)
        scheduler.update_weights(variables, start)
    eval_records = _eval_records(cfg, task, tokenizer)

    def run_eval(step: int, variables) -> dict[str, float]:
        t0 = time.perf_counter()
        eval_engine.load_weights(variables, step)
        if greedy_engine is not None:
            greedy_engine.load_weights(variables, step)
        out = evaluate.evaluate(eval_engine, eval_records, reward_fn, sched_cfg.sampling,
                                cfg.eval.num_samples, seed=cfg.seeds.eval,
                                greedy_engine=greedy_engine)
        out["perf/eval_s"] = time.perf_counter() - t0
        return out

    train_step = rl_step.jit_rl_train_step(model, tx, cfg.rl)
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start or None,
                                       total_steps=cfg.rl.num_steps, is_main=is_main,
                                       console_fields=CONSOLE_FIELDS)
    # time/rl_s: seconds spent in RL steps (rollout, train, weight sync; evaluation and start-up
    # excluded), continued across resumes; the wall-clock axis for comparing schedulers.
    rl_seconds = 0.0
    metrics_path = os.path.join(workdir, metrics_lib.METRICS_FILE)
    if start and is_main and os.path.exists(metrics_path):
        rl_seconds = max((r.get("time/rl_s", 0.0) for r in metrics_lib.read_jsonl(metrics_path)),
                         default=0.0)
    first_eval = None
    if start == 0:
        first_eval = run_eval(0, variables)
        writer.write(0, first_eval)

    # ---------------------------------------------------------------- loop
    final_eval: dict[str, float] = {}
    guard = health.NonFiniteGuard(cfg.checkpoint.max_nonfinite_steps, "rl")
    try:
        for step in range(start + 1, cfg.rl.num_steps + 1):
            t0 = time.perf_counter()
            # Rollout + reward: complete, scored groups of the newest allowed policy versions.
            batch = next(batches)
            t_rollout = time.perf_counter()
            # Train: θ_old log-probs, minibatched policy-loss updates, router-bias update.
            with sharding.use_mesh(mesh):
                state, train_metrics = train_step(state, multihost.to_global(batch, mesh))
            train_metrics = multihost.to_host(train_metrics)
            t_train = time.perf_counter()
            # Weight sync: the scheduler installs version `step` at its next iteration boundary.
            variables = multihost.to_engine({"params": state["params"],
                                             "router": state["router"]}, cfg.mesh.engine)
            if cfg.rl.donate_state:  # the next step deletes the state's buffers
                variables = donation.unaliased(variables, state)
            scheduler.update_weights(variables, step)

            metrics = {k: float(v) for k, v in train_metrics.items()}
            metrics.update(scheduler.pop_metrics())
            trained_tokens = float(batch["loss_mask_BT"].sum())
            metrics.update({"perf/rollout_s": t_rollout - t0, "perf/train_s": t_train - t_rollout,
                            "perf/trained_tokens_per_s": trained_tokens / (t_train - t0)})
            metrics["perf/step_s"] = time.perf_counter() - t0  # evaluation: perf/eval_s
            rl_seconds += metrics["perf/step_s"]
            metrics["time/rl_s"] = rl_seconds
            is_last = step == cfg.rl.num_steps
            if is_last or (cfg.eval.every and step % cfg.eval.every == 0):
                final_eval = run_eval(step, variables)
                metrics.update(final_eval)
            # Metrics of a step are written before its checkpoint, so a resume never loses them.
            writer.write(step, metrics)
            guard.check(step, metrics["train/loss"], metrics["train/params_finite"])  # raises before saving
            preempted = stop.should_stop()   # SIGTERM: save this step, then exit
            if ckpt.due(step) or is_last or preempted:
                ckpt.save(step, state=state, arrays=batches.get_state(),
                          meta={"stage": "rl", "version": step},
                          metrics=({k: v for k, v in metrics.items() if k.startswith("eval/")}
                                   if cfg.checkpoint.best_metric else None))
            if preempted:
                stop.exit(step, ckpt)
    finally:
        scheduler.close()
        ckpt.close()
        writer.close()

    if is_main and final_eval:
        _write_summary(workdir, first_eval, final_eval)
    return final_eval


def _finished_step(cfg: experiment.ExperimentConfig, workdir: str) -> int | None:
    """The last RL step when the run in ``workdir`` already reached ``rl.num_steps``."""
    steps = config_history.saved_steps(os.path.join(workdir, "checkpoints"))
    return steps[-1] if steps and steps[-1] >= cfg.rl.num_steps else None


def _final_eval(workdir: str, step: int) -> dict[str, float]:
    """The evaluation recorded at ``step`` in metrics.jsonl (what `run` returned then)."""
    records = metrics_lib.read_jsonl(os.path.join(workdir, metrics_lib.METRICS_FILE))
    record = next((r for r in reversed(records) if r.get("step") == step), {})
    return {k: v for k, v in record.items() if k.startswith("eval/")}


def _write_summary(workdir: str, first: dict[str, float] | None,
                   final: dict[str, float]) -> None:
    """summary.json and a console table: evaluation before RL (after SFT) and at the end."""
    if first is None:  # a resumed run: the step-0 evaluation is in metrics.jsonl
        first = next((r for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
                      if r.get("step") == 0), {})
    keys = [k for k in final if k.startswith("eval/")]
    summary = {k: {"before_rl": first.get(k), "after_rl": final[k]} for k in keys}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\n{'metric':32s} {'before RL':>10s} {'after RL':>10s}")
    for k in keys:
        before = first.get(k)
        print(f"{k:32s} {before if before is None else f'{before:10.3f}':>10} "
              f"{final[k]:10.3f}")
