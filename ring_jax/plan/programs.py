"""The experiment's device programs, as jitted functions + abstract sharded arguments.

Each builder returns the function the run itself jits — built by the same library calls
`rl_loop` / the engine use (`rl_step.jit_rl_train_step`, `engine.model_functions`,
`engine.jit_programs`) — and `jax.ShapeDtypeStruct` arguments carrying the shardings the run's
arrays have, so lowering them compiles the run's program without allocating anything:

    rl_step   the RL train step (θ_old forward, minibatched policy-loss updates, AdamW,
              router bias) on one scheduler batch [scheduler.batch_size, scheduler.max_seq_len]
    logprob   the step's forward alone: log π_train of one batch (no gradient)
    prefill   the engine's prefill at its largest bucket: engine.num_slots prompts of
              engine.max_len tokens into the slots (engine.prefill_chunk tokens at a time
              when set: chunked prefill)
    decode    the engine's decode program: up to engine.decode_chunk steps over all slots

The engine programs compile on ``meshes.engine``: the training mesh by default (one process,
co-located), or another layout (`ring_jax.plan` ``--engine_mesh``). A new program (or an
engine layout that needs its own builder) registers with `register`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ring_jax import sharding
from ring_jax.model import Transformer
from ring_jax.rollout import engine as engine_lib
from ring_jax.scheduler import batching
from ring_jax.train import optim, rl_step


@dataclasses.dataclass(frozen=True)
class Meshes:
    train: Any
    engine: Any


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted function and the abstract arguments to lower it with, under ``mesh``."""

    fn: Any
    args: tuple[Any, ...]
    mesh: Any


Builder = Callable[[Any, Meshes], Program]
PROGRAMS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Adds a program builder ``(ExperimentConfig, Meshes) -> Program`` under ``name``."""
    def add(builder: Builder) -> Builder:
        PROGRAMS[name] = builder
        return builder
    return add


def abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree``'s leaves with the matching shardings."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def replicated(tree: Any, mesh: Any) -> Any:
    """``tree`` as abstract arrays replicated over ``mesh`` (host inputs of a program)."""
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)


def trainer_variables(cfg: Any, mesh: Any) -> Any:
    """The trainer's {'params', 'router'} as `rl_loop` places them (logical-axis rules)."""
    model = Transformer(cfg.model)
    tokens = jax.ShapeDtypeStruct((1, cfg.scheduler.max_seq_len), jnp.int32)
    with sharding.use_mesh(mesh):
        shardings = sharding.param_shardings(mesh, sharding.param_logical_axes(model, tokens))
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)
    return abstract(shapes, shardings)


def train_state(cfg: Any, mesh: Any, tx: Any) -> dict[str, Any]:
    """The RL state as `rl_loop._init_state` lays it out (optimizer state like the params,
    `sharding.optimizer_state_shardings`)."""
    variables = trainer_variables(cfg, mesh)
    params = variables["params"]
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_shapes = jax.eval_shape(tx.init, params)
    opt_shardings = sharding.optimizer_state_shardings(tx, params, param_shardings, mesh)
    return {"step": replicated(jax.ShapeDtypeStruct((), jnp.int32), mesh), "params": params,
            "opt_state": abstract(opt_shapes, opt_shardings),
            "router": variables.get("router", {})}


def train_batch(cfg: Any, mesh: Any) -> dict[str, Any]:
    """One scheduler batch (`batching.build_batch`'s fields and shapes), split over the batch
    axes as `rl_loop._to_global` splits it."""
    sched = cfg.scheduler
    if cfg.engine.record_expert_ids and cfg.model.is_moe:
        sched = dataclasses.replace(
            sched, expert_ids_shape=(cfg.model.num_moe_layers, cfg.model.num_experts_per_tok))
    host = batching.build_batch([], sched)
    with sharding.use_mesh(mesh):
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(
            mesh, v.shape[0], v.ndim)) for k, v in host.items()}


@register("rl_step")
def build_rl_step(cfg: Any, meshes: Meshes) -> Program:
    tx = optim.make_optimizer(cfg.rl.optim)
    fn = rl_step.jit_rl_train_step(Transformer(cfg.model), tx, cfg.rl)
    return Program(fn, (train_state(cfg, meshes.train, tx), train_batch(cfg, meshes.train)),
                   meshes.train)


@register("logprob")
def build_logprob(cfg: Any, meshes: Meshes) -> Program:
    fn = jax.jit(rl_step.make_logprob_fn(Transformer(cfg.model), chunk_size=cfg.rl.logprob_chunk,
                                         router_replay=cfg.rl.router_replay))
    variables = trainer_variables(cfg, meshes.train)
    return Program(fn, (variables["params"], variables.get("router", {}),
                        train_batch(cfg, meshes.train)), meshes.train)


def _engine(cfg: Any, mesh: Any):
    """The engine's step builder, its weights and its empty slot state, abstract and sharded."""
    m = engine_lib.model_functions(cfg.model, cfg.engine, cfg.precision,
                                   moe_impl=cfg.engine_moe_impl, mesh=mesh)
    fns = engine_lib.step_fns(m.forward, m.init_cache, cfg.engine)
    trainer = trainer_variables(cfg, mesh)
    weights = abstract(jax.eval_shape(m.prepare_weights, trainer, 0), m.weight_sharding)
    state = abstract(jax.eval_shape(fns.empty_state), m.state_sharding)
    return fns, m.state_sharding, weights, state


@register("prefill")
def build_prefill(cfg: Any, meshes: Meshes) -> Program:
    fns, state_sharding, weights, state = _engine(cfg, meshes.engine)
    prefill, _ = engine_lib.jit_programs(fns, state_sharding)
    N, T = cfg.engine.num_slots, cfg.engine.max_len
    row = jax.ShapeDtypeStruct((N,), jnp.int32)
    host = (jax.ShapeDtypeStruct((N, T), jnp.int32), row, row, row, state.rows)
    return Program(prefill, (weights, state, *replicated(host, meshes.engine)), meshes.engine)


@register("decode")
def build_decode(cfg: Any, meshes: Meshes) -> Program:
    fns, state_sharding, weights, state = _engine(cfg, meshes.engine)
    _, decode = engine_lib.jit_programs(fns, state_sharding)
    host = (jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
    return Program(decode, (weights, state, *replicated(host, meshes.engine)), meshes.engine)
