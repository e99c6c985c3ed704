"""``rl.donate_state``: the donated RL step computes what the undonated one does, really donates
(the old state's buffers are gone), and the engine's copy made by `donation.unaliased` survives
the step that deletes the arrays it was taken from."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax.model import Transformer, presets
from ring_jax.train import donation, experiment, optim, rl_step

B, T = 4, 12
CFG = dataclasses.replace(presets.get("tiny"), moe_impl="reference")
MODEL = Transformer(CFG)


def _rl_cfg(donate: bool) -> experiment.RLConfig:
    return experiment.RLConfig(num_minibatches=2, logprob_chunk=5, donate_state=donate)


def _state():
    tx = optim.make_optimizer(_rl_cfg(False).optim)
    variables = jax.jit(MODEL.init)(jax.random.key(0), jnp.zeros((1, T), jnp.int32))
    return {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
            "opt_state": tx.init(variables["params"]), "router": variables["router"]}


def _batch(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
    loss_mask = np.zeros((B, T), np.float32)
    loss_mask[:, 3:9] = 1.0
    return {"tokens_BT": tokens,
            "targets_BT": np.concatenate([tokens[:, 1:], np.zeros((B, 1), np.int32)], 1),
            "loss_mask_BT": loss_mask,
            "logp_infer_BT": (-rng.uniform(0.5, 8.0, (B, T)) * loss_mask).astype(np.float32),
            "versions_BT": np.where(loss_mask > 0, 0, -1).astype(np.int32),
            "advantages_B": np.array([1.0, -1.0, 0.5, -0.5], np.float32),
            "rewards_B": np.array([1.0, 0.0, 1.0, 0.0], np.float32)}


@pytest.fixture(scope="module")
def step_fns():
    tx = optim.make_optimizer(_rl_cfg(False).optim)
    return {d: rl_step.jit_rl_train_step(MODEL, tx, _rl_cfg(d)) for d in (False, True)}


def test_donated_steps_equal_undonated_and_free_the_old_state(step_fns):
    runs = {}
    for donate in (False, True):
        state, first, metrics = _state(), None, []
        for seed in (0, 1):
            old = state
            state, m = step_fns[donate](state, _batch(seed))
            metrics.append(m)
            first = first or old
        assert all(x.is_deleted() == donate for x in jax.tree.leaves(first["params"]))
        runs[donate] = (state, metrics)
    for a, b in zip(jax.tree.leaves(runs[False]), jax.tree.leaves(runs[True])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_engine_copy_survives_the_donated_step(step_fns):
    """What `rl_loop` hands the engine: the state's own arrays (as `multihost.to_engine` does
    on one process) are deleted by the donated step; `unaliased` copies are not, and hold the
    weights of before the step."""
    state, before = _state(), _state()  # the same initial weights twice
    shared = {"params": state["params"], "router": state["router"]}
    engine_vars = donation.unaliased(shared, state)
    step_fns[True](state, _batch(0))
    assert all(x.is_deleted() for x in jax.tree.leaves(shared["params"]))
    expected = {"params": before["params"], "router": before["router"]}
    for copy, leaf in zip(jax.tree.leaves(engine_vars), jax.tree.leaves(expected)):
        assert not copy.is_deleted()
        np.testing.assert_array_equal(np.asarray(copy), np.asarray(leaf))


def test_unaliased_copies_only_what_shares_a_buffer():
    owned, own, host = jnp.arange(6.0), jnp.ones(3), np.zeros(2)
    out = donation.unaliased({"owned": owned, "own": own, "host": host}, {"x": owned})
    assert out["owned"] is not owned and out["owned"].sharding == owned.sharding
    np.testing.assert_array_equal(np.asarray(out["owned"]), np.asarray(owned))
    assert out["own"] is own and out["host"] is host
