"""The RL loop: SFT warm start, then GRPO + IcePop with the C3PO++ scheduler (PAPER §1-§3).

One controller (this Python process; one per host in a multi-host run) drives SPMD programs:

  setup      mesh, tokenizer, task, model, reward function
  SFT        Long-CoT SFT warm start on the task's worked solutions (`train/sft.py`), resumable
  restore    the latest RL checkpoint (one consistent cut: train state + scheduler state,
             including unfinished rollouts and the prompt-iterator position), else initialise
             from the SFT stage / ``init_from`` (an SFT or RL workdir, or a local HF checkpoint
             directory) / scratch
  loop       rollout → reward (the scheduler: engine + reward workers, complete groups only)
             → train (recompute log π_train(θ_old), minibatched policy-loss updates, router bias)
             → weight sync (published to the scheduler; the engine installs it at the next
               iteration boundary) → evaluation → metrics → checkpoint

Every policy version v is the number of RL steps taken; the engine stamps each token with it.
Resuming a killed run continues exactly as if it had not stopped (CPU): the scheduler's state is
restored at the same iteration boundary and every sampling seed is a function of that state.
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
from ring_jax.config import ConfigError
from ring_jax.model import Transformer, hf
from ring_jax.rl import advantages as advantages_lib
from ring_jax.rollout.engine import Engine
from ring_jax.scheduler import Scheduler
from ring_jax.train import checkpoint as checkpoint_lib
from ring_jax.train import distributed, evaluate, experiment, optim, rl_step, sft
from ring_jax.train import metrics as metrics_lib

CONSOLE_FIELDS = {"reward": "rl/reward_mean", "eval": "eval/pass@1",
                  "|Δlogp|": "mismatch/abs_logp_diff_mean", "masked": "mismatch/masked_frac",
                  "tok/s": "perf/trained_tokens_per_s"}


def _scheduler_config(cfg: experiment.ExperimentConfig, tokenizer) -> Any:
    """The scheduler config with the tokenizer's stop token and the engine's routing shape."""
    sampling = cfg.scheduler.sampling
    stops = tuple(dict.fromkeys((*sampling.stop_token_ids, tokenizer.eos_id)))
    expert_ids_shape = None
    if cfg.engine.record_expert_ids and cfg.model.is_moe:
        expert_ids_shape = (cfg.model.num_moe_layers, cfg.model.num_experts_per_tok)
    return dataclasses.replace(cfg.scheduler, expert_ids_shape=expert_ids_shape,
                               sampling=dataclasses.replace(sampling, stop_token_ids=stops))


def _eval_records(cfg: experiment.ExperimentConfig, task, tokenizer) -> list[dict[str, Any]]:
    """The held-out evaluation prompts: the task's held-out problems (`Task.held_out`) drawn
    with the evaluation seed."""
    ds = pipeline.prompt_dataset(task.held_out(), tokenizer,
                                 seed=cfg.seed + cfg.eval.seed_offset,
                                 num_prompts=cfg.eval.num_prompts, thinking=cfg.task.thinking)
    return [ds[i] for i in range(len(ds))]


def _engine_mesh(mesh):
    """The engine's devices. One process: the training mesh (co-located, PAPER §3 hybrid
    runtime). Several processes: each process's local devices — every host runs the same engine
    on the same inputs (the scheduler's decisions are functions of shared state), so all hosts
    hold identical rollouts and the engine never reads arrays another host owns."""
    if jax.process_count() == 1:
        return mesh
    return sharding.make_mesh(data=jax.local_device_count(), devices=jax.local_devices())


def _to_engine(variables):
    """Trainer variables as the engine takes them: unchanged on one process; gathered to host
    (one full copy per process) when the training mesh spans processes."""
    if jax.process_count() == 1:
        return variables
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(variables, tiled=True)


def _to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """The host batch (identical on every process) as global arrays split over the batch axes."""
    out = {}
    for k, v in batch.items():
        sharding_v = sharding.batch_sharding(mesh, v.shape[0], v.ndim)
        out[k] = jax.make_array_from_callback(v.shape, sharding_v, lambda idx, v=v: v[idx])
    return out


def _to_host(tree):
    """Replicated (scalar) outputs of the train step as numpy, on every process."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _load_hf(path: str, model_cfg) -> dict:
    """Variables of a local HF checkpoint (BailingMoeV2 / Glm4Moe); its architecture must be
    the experiment's ``model`` (dtypes and the MoE dispatch may differ)."""
    hf_cfg, variables = hf.load(path, param_dtype=model_cfg.param_dtype)
    free = ("param_dtype", "dtype", "moe_impl", "capacity_factor", "min_capacity",
            "num_mtp_layers", "initializer_range", "remat_policy",
            "attention_chunk")
    diff = {f.name: (getattr(hf_cfg, f.name), getattr(model_cfg, f.name))
            for f in dataclasses.fields(model_cfg) if f.name not in free
            and getattr(hf_cfg, f.name) != getattr(model_cfg, f.name)}
    if diff:
        raise ConfigError(f"init_from={path!r}: the checkpoint's architecture differs from "
                          f"model: " + ", ".join(f"model.{k}={v[1]!r} but the checkpoint has "
                                                 f"{v[0]!r}" for k, v in sorted(diff.items())))
    return variables


def _init_state(cfg, model, tx, mesh, workdir: str, load_policy: bool) -> dict:
    """Fresh RL state placed on the mesh, with the policy from SFT / ``init_from`` if any and
    ``load_policy`` (a resumed run restores its own checkpoint over this state instead)."""
    tokens = jnp.zeros((1, cfg.scheduler.max_seq_len), jnp.int32)
    with sharding.use_mesh(mesh):
        var_shardings = sharding.param_shardings(
            mesh, sharding.param_logical_axes(model, tokens))
        variables = jax.jit(model.init, out_shardings=var_shardings)(
            jax.random.key(cfg.seed), tokens)
        policy_dir = cfg.init_from or (os.path.join(workdir, "sft") if cfg.sft.num_steps else "")
        policy_dir = policy_dir if load_policy else ""
        if policy_dir and os.path.exists(os.path.join(policy_dir, "config.json")) and \
                not os.path.isdir(os.path.join(policy_dir, "checkpoints")):
            variables = jax.device_put(_load_hf(policy_dir, cfg.model), var_shardings)
        elif policy_dir:
            variables = sft.load_policy(policy_dir, variables)
        params = variables["params"]
        opt_shardings = sharding.optimizer_state_shardings(tx, params, var_shardings["params"],
                                                           mesh)
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": jax.jit(tx.init, out_shardings=opt_shardings)(params),
                "router": variables.get("router", {})}


def run(cfg: experiment.ExperimentConfig, workdir: str) -> dict[str, float]:
    """Runs (or resumes) the experiment in ``workdir``; returns the final evaluation."""
    # ---------------------------------------------------------------- setup
    distributed.maybe_initialize()
    is_main = distributed.is_main()
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        metrics_lib.write_config_json(workdir, experiment.to_dict(cfg))
    mesh = sharding.make_mesh(**cfg.mesh.resolve(jax.device_count()),
                              allow_split_physical_axes=cfg.mesh.allow_split_physical_axes)
    tokenizer = get_tokenizer(cfg.task.tokenizer)
    task = tasks.get(cfg.task.name, **dict(cfg.task.kwargs))
    model = Transformer(cfg.model)
    sched_cfg = _scheduler_config(cfg, tokenizer)
    reward_fn = rewards.make_reward_fn(cfg.reward, task, tokenizer)

    # ---------------------------------------------------------------- SFT warm start
    if cfg.sft.num_steps:
        sft.train_sft(model, task, tokenizer, os.path.join(workdir, "sft"), cfg.sft,
                      cfg.sft_optim, cfg.checkpoint, rng=jax.random.key(cfg.seed),
                      is_main=is_main)

    # ---------------------------------------------------------------- restore or initialise
    tx = optim.make_optimizer(cfg.rl.optim)
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
    resuming = ckpt.latest_step() is not None
    state = _init_state(cfg, model, tx, mesh, workdir, load_policy=not resuming)
    start, sched_state = 0, None
    if resuming:
        restored = ckpt.restore(state)
        state, start, sched_state = restored.state, restored.step, restored.arrays

    variables = _to_engine({"params": state["params"], "router": state["router"]})
    engine_kw = dict(precision=cfg.precision, version=start, moe_impl=cfg.engine_moe_impl,
                     mesh=_engine_mesh(mesh), detokenize=tokenizer.decode)
    engine = Engine.from_model(cfg.model, variables, cfg.engine, **engine_kw)
    # Between scheduler iterations the engine is idle (sync, c3po: unfinished responses wait in
    # the scheduler's buffer), so evaluation reuses it and its compiled programs; in async mode
    # the producer thread owns it, so evaluation gets its own.
    eval_engine = engine if cfg.scheduler.mode != "async" else Engine.from_model(
        cfg.model, variables, dataclasses.replace(cfg.engine, record_expert_ids=False),
        **engine_kw)
    prompts = pipeline.prompt_iterator(pipeline.prompt_dataset(
        task, tokenizer, seed=cfg.seed, num_epochs=None, num_prompts=cfg.task.num_prompts,
        thinking=cfg.task.thinking))
    group_advantages = jax.jit(lambda rewards_NG: advantages_lib.compute_advantages(
        rewards_NG, cfg.rl.advantage).advantages)
    advantage_fn = lambda rewards_G: np.asarray(group_advantages(
        np.asarray(rewards_G, np.float32)[None]))[0]
    scheduler = Scheduler(
        sched_cfg, engine, prompts,
        reward_fn=lambda record, request: reward_fn(record, request.tokens,
                                                    request.finish_reason),
        advantage_fn=advantage_fn)
    if sched_state is not None:
        scheduler.load_state_dict(sched_state)
        scheduler.update_weights(variables, start)
    eval_records = _eval_records(cfg, task, tokenizer)

    def run_eval(step: int, variables) -> dict[str, float]:
        t0 = time.perf_counter()
        eval_engine.load_weights(variables, step)
        out = evaluate.evaluate(eval_engine, eval_records, reward_fn, sched_cfg.sampling,
                                cfg.eval.num_samples, seed=cfg.seed)
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
    try:
        for step in range(start + 1, cfg.rl.num_steps + 1):
            t0 = time.perf_counter()
            # Rollout + reward: complete, scored groups of the newest allowed policy versions.
            batch = scheduler.next_batch()
            t_rollout = time.perf_counter()
            # Train: θ_old log-probs, minibatched policy-loss updates, router-bias update.
            with sharding.use_mesh(mesh):
                state, train_metrics = train_step(state, _to_global(batch, mesh))
            train_metrics = _to_host(train_metrics)
            t_train = time.perf_counter()
            # Weight sync: the scheduler installs version `step` at its next iteration boundary.
            variables = _to_engine({"params": state["params"], "router": state["router"]})
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
            if ckpt.due(step) or is_last:
                ckpt.save(step, state=state, arrays=scheduler.state_dict(),
                          meta={"stage": "rl", "version": step},
                          metrics=({k: v for k, v in metrics.items() if k.startswith("eval/")}
                                   if cfg.checkpoint.best_metric else None))
    finally:
        scheduler.close()
        ckpt.close()
        writer.close()

    if is_main and final_eval:
        _write_summary(workdir, first_eval, final_eval)
    return final_eval


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
