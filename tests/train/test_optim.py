"""Optimizer: schedule values, clipping, AdamW parity with optax, and the non-finite skip."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ring_jax.config import ConfigError
from ring_jax.train import optim


def _params():
    return {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 10, "b": jnp.ones((3,))}


def test_warmup_then_constant_hand_values():
    sched = optim.make_schedule(optim.OptimConfig(learning_rate=1.0, warmup_steps=4))
    # Update 0 already trains at lr/4 (a schedule starting at 0 would waste the first update).
    got = [float(sched(i)) for i in range(7)]
    np.testing.assert_allclose(got, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0], rtol=1e-6)


def test_warmup_then_cosine_hand_values():
    cfg = optim.OptimConfig(learning_rate=2.0, warmup_steps=2, decay="cosine", decay_steps=6,
                            end_lr_fraction=0.5)
    sched = optim.make_schedule(cfg)
    got = [float(sched(i)) for i in range(9)]
    # Cosine from 2.0 to 1.0 over the 4 steps after warmup: 2, 1.5+0.5cos(pi/4)=1.8536, 1.5, ...
    want = [1.0, 2.0, 2.0, 1.0 + 0.5 * (1 + np.cos(np.pi / 4)), 1.5,
            1.0 + 0.5 * (1 + np.cos(3 * np.pi / 4)), 1.0, 1.0, 1.0]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_matches_plain_optax_adamw_with_clipping():
    cfg = optim.OptimConfig(learning_rate=0.1, warmup_steps=0, clip_norm=0.5, weight_decay=0.01)
    tx = optim.make_optimizer(cfg)
    mask = lambda p: {"w": True, "b": False}   # decay on matrices only
    ref = optax.chain(optax.clip_by_global_norm(0.5),
                      optax.adamw(0.1, weight_decay=0.01, mask=mask))
    params, ref_params = _params(), _params()
    state, ref_state = tx.init(params), ref.init(ref_params)
    for i in range(3):
        grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1)) * 3.0, params)
        ref_grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1)) * 3.0, ref_params)
        upd, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, upd)
        ref_upd, ref_state = ref.update(ref_grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, ref_upd)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, ref_params)
    assert int(optim.applied_steps(state)) == 3


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_nonfinite_grad_skips_step_and_counts(bad):
    cfg = optim.OptimConfig(learning_rate=0.1, warmup_steps=2)
    tx = optim.make_optimizer(cfg)
    params = _params()
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    good = jax.tree.map(jnp.ones_like, params)
    upd, state = step(good, state, params)
    params = optax.apply_updates(params, upd)
    before_params, before_state = params, state

    poisoned = {"w": good["w"].at[1, 2].set(bad), "b": good["b"]}
    upd, state = step(poisoned, state, params)
    params = optax.apply_updates(params, upd)
    # Bit-identical params and inner state; a bug that only zeroes the bad entry would move "b".
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, before_params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
                 state.inner_state, before_state.inner_state)
    assert int(optim.skipped_steps(state)) == 1
    assert int(optim.applied_steps(state)) == 1

    # The run continues: the next finite step is applied with the schedule's step-1 rate.
    upd, state = step(good, state, params)
    params2 = optax.apply_updates(params, upd)
    assert not np.array_equal(params2["w"], params["w"])
    assert int(optim.skipped_steps(state)) == 1
    assert int(optim.applied_steps(state)) == 2
    assert float(optim.current_learning_rate(cfg, state)) == pytest.approx(0.1)


def test_skip_disabled_propagates_nan():
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=0.1, skip_nonfinite=False))
    params = _params()
    state = tx.init(params)
    grads = {"w": jnp.full((2, 3), jnp.nan), "b": jnp.ones((3,))}
    upd, state = tx.update(grads, state, params)
    assert np.isnan(np.asarray(optax.apply_updates(params, upd)["w"])).all()
    assert int(optim.skipped_steps(state)) == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate=0.0), "learning_rate=0.0 is invalid: must be > 0.0"),
    (dict(warmup_steps=-1), "warmup_steps=-1 is invalid: must be >= 0"),
    (dict(decay="linear"), "decay='linear' is invalid: must be one of ('constant', 'cosine')"),
    (dict(decay="cosine", warmup_steps=5, decay_steps=5),
     "decay_steps=5 is invalid: must be > warmup_steps=5 when decay='cosine'"),
    (dict(end_lr_fraction=1.5), "end_lr_fraction=1.5 is invalid: must be <= 1.0"),
    (dict(b2=1.0), "b2=1.0 is invalid: must be < 1"),
    (dict(eps=0.0), "eps=0.0 is invalid: must be > 0.0"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1 is invalid: must be >= 0.0"),
    (dict(clip_norm=-1.0), "clip_norm=-1.0 is invalid: must be >= 0.0"),
    (dict(skip_nonfinite=1), "skip_nonfinite=1 is invalid: must be a bool"),
])
def test_invalid_configs_name_the_field(kwargs, message):
    with pytest.raises(ConfigError) as err:
        optim.OptimConfig(**kwargs)
    assert str(err.value) == message
