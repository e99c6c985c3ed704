"""NonFiniteGuard: a run stops at the N-th consecutive non-finite step, before saving it."""
import logging

import jax
import jax.numpy as jnp
import pytest

from ring_jax.train import health, integrity

GOOD, NAN_PARAMS = 1.0, 0.0   # the step's train/params_finite metric


def test_all_finite_inside_jit_reads_floating_leaves_only():
    good = {"w": jnp.ones((3,)), "b": jnp.zeros((2,), jnp.bfloat16), "n": jnp.arange(2)}
    all_finite = jax.jit(integrity.all_finite)
    assert bool(all_finite(good))
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        assert not bool(all_finite({**good, "w": jnp.array([1.0, bad, 1.0])}))
    assert not bool(all_finite({**good, "b": jnp.full((2,), jnp.nan, jnp.bfloat16)}))
    assert bool(all_finite({"n": jnp.arange(2)}))   # no floating leaf: nothing can be NaN


def test_streak_of_n_stops_and_a_finite_step_resets(caplog):
    guard = health.NonFiniteGuard(3, "rl")
    with caplog.at_level(logging.WARNING, logger=health.__name__):
        guard.check(1, float("nan"), GOOD)      # loss NaN (the optimizer skipped the update)
        guard.check(2, 0.5, NAN_PARAMS)         # params NaN
        guard.check(3, 0.5, GOOD)               # finite: the streak resets
        guard.check(4, float("inf"), GOOD)
        guard.check(5, 0.5, NAN_PARAMS)
        # A guard counting total (not consecutive) bad steps would have stopped at step 3.
        with pytest.raises(health.NonFiniteError) as err:
            guard.check(6, 0.5, NAN_PARAMS)
    assert "rl step 6: non-finite parameters, 3 consecutive steps" in str(err.value)
    assert "checkpoint.max_nonfinite_steps=3" in str(err.value)
    assert "stopped before saving step 6" in str(err.value)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "rl step 1: non-finite loss (nan) (1 of 2 allowed in a row)"
    assert len(messages) == 4   # steps 1, 2, 4, 5


def test_one_means_stop_at_the_first():
    guard = health.NonFiniteGuard(1, "sft")
    guard.check(1, 2.0, GOOD)
    with pytest.raises(health.NonFiniteError, match="sft step 2: non-finite loss"):
        guard.check(2, float("nan"), GOOD)
