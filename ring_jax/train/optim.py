"""The optimizer of the RL and SFT loops: AdamW, linear warmup, clipping, non-finite skip.

PAPER.md's training recipe updates the policy with AdamW after a warmup; at RL scale a single
step with a non-finite gradient (an overflow in a long rollout, a bad expert) would poison both
the parameters and Adam's moments, so such a step is skipped instead and counted, and the count
is reported as a metric (`train/skipped_steps`).

    tx = make_optimizer(OptimConfig(learning_rate=1e-5, warmup_steps=10))
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ring_jax import config as config_lib


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with a linear warmup and a constant or cosine decay.

    learning_rate: peak rate, reached after `warmup_steps` updates.
    decay: "constant" keeps the peak; "cosine" decays to `end_lr_fraction * learning_rate`
      at `decay_steps` (counted from step 0, warmup included) and stays there.
    clip_norm: global-norm clip of the raw gradient; 0 disables clipping.
    skip_nonfinite: skip (and count) updates whose gradient holds a NaN or inf.
    """
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    decay: str = "constant"
    decay_steps: int = 0
    end_lr_fraction: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    skip_nonfinite: bool = True

    def __post_init__(self):
        config_lib.check_float("learning_rate", self.learning_rate, min_value=0.0,
                               min_exclusive=True)
        config_lib.check_int("warmup_steps", self.warmup_steps, min_value=0)
        config_lib.check_one_of("decay", self.decay, ("constant", "cosine"))
        config_lib.check_int("decay_steps", self.decay_steps, min_value=0)
        if self.decay == "cosine":
            config_lib.check(self.decay_steps > self.warmup_steps, "decay_steps",
                             self.decay_steps,
                             f"must be > warmup_steps={self.warmup_steps} when decay='cosine'")
        config_lib.check_float("end_lr_fraction", self.end_lr_fraction, min_value=0.0,
                               max_value=1.0)
        config_lib.check_float("b1", self.b1, min_value=0.0, max_value=1.0)
        config_lib.check(self.b1 < 1.0, "b1", self.b1, "must be < 1")
        config_lib.check_float("b2", self.b2, min_value=0.0, max_value=1.0)
        config_lib.check(self.b2 < 1.0, "b2", self.b2, "must be < 1")
        config_lib.check_float("eps", self.eps, min_value=0.0, min_exclusive=True)
        config_lib.check_float("weight_decay", self.weight_decay, min_value=0.0)
        config_lib.check_float("clip_norm", self.clip_norm, min_value=0.0)
        config_lib.check(isinstance(self.skip_nonfinite, bool), "skip_nonfinite",
                         self.skip_nonfinite, "must be a bool")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Learning rate as a function of the number of applied (not skipped) updates."""
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    if cfg.decay == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    else:
        after = optax.cosine_decay_schedule(cfg.learning_rate,
                                            cfg.decay_steps - cfg.warmup_steps,
                                            alpha=cfg.end_lr_fraction)
    if cfg.warmup_steps == 0:
        return after
    # Step 0 trains at lr/warmup rather than 0, so no update is wasted.
    warmup_from_one = lambda count: warmup(count + 1)
    return optax.join_schedules([warmup_from_one, after], [cfg.warmup_steps])


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: norms' scales and biases keep their value."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


class SkipNonFiniteState(NamedTuple):
    inner_state: Any
    skipped_steps: jax.Array   # int32 scalar: updates skipped so far (whole run)


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Applies `inner` only when every gradient entry is finite.

    On a non-finite gradient the returned updates are exactly zero and `inner`'s state is kept
    as it was (Adam's moments and step count untouched), so the parameters after
    `optax.apply_updates` are bit-identical to before; `skipped_steps` grows by one.
    """

    def init_fn(params):
        return SkipNonFiniteState(inner.init(params), jnp.zeros((), jnp.int32))

    def update_fn(grads, state, params=None):
        leaves = jax.tree.leaves(grads)
        is_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves]))
        updates, new_inner = inner.update(grads, state.inner_state, params)
        # Select rather than cond: both branches are cheap and the select keeps one program.
        updates = jax.tree.map(lambda u: jnp.where(is_finite, u, jnp.zeros_like(u)), updates)
        new_inner = jax.tree.map(lambda new, old: jnp.where(is_finite, new, old), new_inner,
                                 state.inner_state)
        skipped = state.skipped_steps + jnp.where(is_finite, 0, 1).astype(jnp.int32)
        return updates, SkipNonFiniteState(new_inner, skipped)

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW(schedule), wrapped in the non-finite skip when enabled."""
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask))
    tx = optax.chain(*parts)
    return skip_nonfinite(tx) if cfg.skip_nonfinite else tx


def skipped_steps(opt_state: Any) -> jax.Array:
    """The number of skipped updates recorded in `opt_state` (0 when skipping is off)."""
    if isinstance(opt_state, SkipNonFiniteState):
        return opt_state.skipped_steps
    return jnp.zeros((), jnp.int32)


def applied_steps(opt_state: Any) -> jax.Array:
    """The number of updates AdamW has applied (the schedule's step), read from its state."""
    counts = [s.count for s in jax.tree.leaves(
        opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)]
    return counts[0]


def current_learning_rate(cfg: OptimConfig, opt_state: Any) -> jax.Array:
    """The learning rate the next applied update will use (for the `train/lr` metric)."""
    return make_schedule(cfg)(applied_steps(opt_state))
