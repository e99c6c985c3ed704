"""The RL train step on the tiny MoE: loss parity with `losses.policy_loss`, non-finite skip,
masked rows, router replay, and minibatch bookkeeping."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax.model import Transformer, presets
from ring_jax.rl import logprobs, losses
from ring_jax.train import optim, rl_step, router_bias

B, T = 4, 12
CFG = dataclasses.replace(presets.get("tiny"), moe_impl="reference")
MODEL = Transformer(CFG)
LOSS_CFG = losses.LossConfig(correction="icepop", alpha=0.5, beta=5.0)
OPTIM_CFG = optim.OptimConfig(learning_rate=1e-2, clip_norm=0.0)
TX = optim.make_optimizer(OPTIM_CFG)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
    prompt_len = np.array([3, 4, 2, 5])
    resp_len = np.array([5, 3, 7, 4])
    loss_mask = np.zeros((B, T), np.float32)
    for b in range(B):
        loss_mask[b, prompt_len[b] - 1:prompt_len[b] + resp_len[b] - 1] = 1.0
        tokens[b, prompt_len[b] + resp_len[b]:] = 0
    targets = np.concatenate([tokens[:, 1:], np.zeros((B, 1), np.int32)], 1)
    return {"tokens_BT": tokens, "targets_BT": targets, "loss_mask_BT": loss_mask,
            "logp_infer_BT": (-rng.uniform(0.5, 8.0, (B, T)) * loss_mask).astype(np.float32),
            "versions_BT": np.where(loss_mask > 0, 0, -1).astype(np.int32),
            "advantages_B": np.array([1.0, -1.0, 0.5, -0.5], np.float32),
            "rewards_B": np.array([1.0, 0.0, 1.0, 0.0], np.float32)}


@pytest.fixture(scope="module")
def state():
    variables = jax.jit(MODEL.init)(jax.random.key(0), jnp.zeros((1, T), jnp.int32))
    return {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
            "opt_state": TX.init(variables["params"]), "router": variables["router"]}


@pytest.fixture(scope="module")
def step_fn():
    return jax.jit(rl_step.make_rl_train_step(MODEL, TX, LOSS_CFG, num_minibatches=2,
                                              router_bias_rate=1e-3, logprob_chunk=5))


def test_valid_inputs_cover_prompt_and_response():
    mask = np.zeros((2, 8), np.float32)
    mask[0, 2:5] = 1  # prompt of 3, response of 3: real inputs are t = 0..5
    mask[1, 0:1] = 1  # prompt of 1, response of 1: real inputs are t = 0..1
    np.testing.assert_array_equal(rl_step._valid_inputs_BT(jnp.asarray(mask)),
                                  [[1, 1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]])


def test_metrics_match_policy_loss_at_theta_old(state, step_fn):
    """At θ_old, the first minibatch's loss equals `policy_loss` on the same rows computed from a
    plain (unchunked) forward: the step's plumbing (targets, masks, segments) is right."""
    batch = _batch()
    new_state, metrics = step_fn(state, batch)
    variables = {"params": state["params"], "router": state["router"]}
    seg = rl_step._valid_inputs_BT(jnp.asarray(batch["loss_mask_BT"]))
    logits, _ = MODEL.apply(variables, batch["tokens_BT"], segment_ids_BT=seg)
    logp, _ = logprobs.logprobs_from_logits(logits, batch["targets_BT"])
    half = slice(0, B // 2)
    loss, _ = losses.policy_loss(logp[half], logp[half], batch["logp_infer_BT"][half],
                                 batch["advantages_B"][half], batch["loss_mask_BT"][half],
                                 LOSS_CFG)
    # train/loss is the mean of the two minibatch losses; the first one is at θ_old exactly.
    assert np.isfinite(float(metrics["train/loss"]))
    full_loss, full_metrics = losses.policy_loss(
        logp, logp, batch["logp_infer_BT"], batch["advantages_B"], batch["loss_mask_BT"],
        LOSS_CFG)
    np.testing.assert_allclose(metrics["mismatch/abs_logp_diff_mean"],
                               full_metrics["mismatch/abs_logp_diff_mean"], rtol=1e-5)
    np.testing.assert_allclose(metrics["mismatch/masked_frac"],
                               full_metrics["mismatch/masked_frac"], rtol=1e-6)
    assert float(loss) != 0.0
    assert int(new_state["step"]) == 1
    # Params moved; the optimizer applied two updates (one per minibatch).
    assert int(optim.applied_steps(new_state["opt_state"])) == 2
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new_state["params"],
                         state["params"])
    assert max(jax.tree.leaves(moved)) > 0


def test_masked_removed_from_denominator_reaches_the_step(state):
    """With one minibatch, train/loss is `policy_loss` at θ_old, also when masked tokens leave
    the denominator (the step must hand `loss_denominator` the kept tokens)."""
    batch = _batch()
    variables = {"params": state["params"], "router": state["router"]}
    seg = rl_step._valid_inputs_BT(jnp.asarray(batch["loss_mask_BT"]))
    logits, _ = MODEL.apply(variables, batch["tokens_BT"], segment_ids_BT=seg)
    logp, _ = logprobs.logprobs_from_logits(logits, batch["targets_BT"])
    inputs = (logp, logp, batch["logp_infer_BT"], batch["advantages_B"], batch["loss_mask_BT"])
    for aggregation in ("seq_mean_token_mean", "token_mean"):
        cfg = dataclasses.replace(LOSS_CFG, aggregation=aggregation, masked_in_denominator=False)
        fn = jax.jit(rl_step.make_rl_train_step(MODEL, TX, cfg, router_bias_rate=0.0))
        _, metrics = fn(state, batch)
        expected, m = losses.policy_loss(*inputs, cfg)
        kept_in, _ = losses.policy_loss(*inputs, dataclasses.replace(
            cfg, masked_in_denominator=True))
        assert 0 < float(m["mismatch/masked_frac"]) < 1
        assert float(expected) != float(kept_in)
        np.testing.assert_allclose(metrics["train/loss"], expected, rtol=1e-4, atol=1e-7)


def test_router_bias_moves_outside_gradient(state, step_fn):
    new_state, _ = step_fn(state, _batch())
    before = router_bias.stack_expert_bias(state["router"])
    after = router_bias.stack_expert_bias(new_state["router"])
    # |Δb| = u·|sign(offset) - mean(sign)| <= 2u, and some expert moves.
    delta = np.abs(np.asarray(after - before))
    assert delta.max() > 0 and delta.max() <= 2e-3 + 1e-9


def test_nonfinite_gradient_is_skipped_and_counted(state, step_fn):
    batch = _batch()
    batch["advantages_B"] = np.array([np.nan, 1.0, 1.0, 1.0], np.float32)
    new_state, metrics = step_fn(state, batch)
    # The first minibatch holds the NaN row: skipped; the second applies normally.
    assert int(metrics["train/skipped_steps"]) == 1
    assert int(optim.applied_steps(new_state["opt_state"])) == 1
    batch["advantages_B"] = np.full((B,), np.nan, np.float32)
    new_state, metrics = step_fn(state, batch)
    assert int(metrics["train/skipped_steps"]) == 2
    jax.tree.map(np.testing.assert_array_equal, new_state["params"], state["params"])
    assert metrics["train/params_finite"] == 1.0   # skipped updates keep the weights finite


def test_step_reports_poisoned_parameters(state, step_fn):
    # The NonFiniteGuard reads this metric: a NaN weight must show up in it.
    poisoned = jax.tree.map(lambda x: x, state)
    poisoned["params"] = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan),
                                      state["params"])
    _, metrics = step_fn(poisoned, _batch())
    assert metrics["train/params_finite"] == 0.0


def test_padding_rows_do_not_change_the_update(state):
    """A batch with an all-padding row gives the same update as without it in the
    token_mean aggregation (the denominator counts response tokens only)."""
    cfg = dataclasses.replace(LOSS_CFG, aggregation="token_mean")
    fn = jax.jit(rl_step.make_rl_train_step(MODEL, TX, cfg, router_bias_rate=0.0))
    batch = _batch()
    padded = {k: v.copy() for k, v in batch.items()}
    padded["loss_mask_BT"][3] = 0.0
    padded["tokens_BT"][3] = 0
    padded["targets_BT"][3] = 0
    sliced = {k: v[:3] for k, v in batch.items()}
    a, _ = fn(state, padded)
    b, _ = fn(state, sliced)  # a second trace of the same step, for 3 rows
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-7),
                 a["params"], b["params"])


def test_router_replay_of_own_routing_is_a_no_op(state):
    """Forcing the experts the trainer would pick anyway changes nothing; -1 rows fall back."""
    batch = _batch()
    variables = {"params": state["params"], "router": state["router"]}
    seg = rl_step._valid_inputs_BT(jnp.asarray(batch["loss_mask_BT"]))
    _, aux = MODEL.apply(variables, batch["tokens_BT"], segment_ids_BT=seg,
                         return_expert_ids=True)
    ids_BTLK = np.transpose(np.asarray(aux["expert_ids"]), (1, 2, 0, 3)).copy()
    ids_BTLK[:, :2] = -1  # prompt positions: trainer's own routing
    plain = jax.jit(rl_step.make_logprob_fn(MODEL, chunk_size=4, router_replay=False))
    replay = jax.jit(rl_step.make_logprob_fn(MODEL, chunk_size=4, router_replay=True))
    logp_a, _, _ = plain(state["params"], state["router"], batch)
    logp_b, _, _ = replay(state["params"], state["router"], {**batch,
                                                            "expert_ids_BTLK": ids_BTLK})
    np.testing.assert_allclose(logp_a, logp_b, atol=1e-6)
    # Forcing different experts does change the log-probs (replay is not silently ignored).
    shifted = np.where(ids_BTLK >= 0, (ids_BTLK + 1) % CFG.num_experts, -1)
    logp_c, _, _ = replay(state["params"], state["router"], {**batch,
                                                            "expert_ids_BTLK": shifted})
    assert float(jnp.abs(logp_c - logp_a).max()) > 1e-4


def test_entropy_bonus_has_a_gradient_without_advantages(state):
    """All-zero advantages leave only the entropy bonus: it must still move the parameters
    (the entropy is computed at θ inside the loss, not taken from the θ_old forward)."""
    cfg = dataclasses.replace(LOSS_CFG, entropy_coef=0.01)
    fn = jax.jit(rl_step.make_rl_train_step(MODEL, TX, cfg, router_bias_rate=0.0))
    batch = _batch()
    batch["advantages_B"] = np.zeros((B,), np.float32)
    _, metrics = fn(state, batch)
    assert float(metrics["train/grad_norm"]) > 0


@pytest.mark.parametrize("masked_in_denominator", [True, False])
def test_logp_old_from_update_equals_the_recompute(state, masked_in_denominator):
    """With one minibatch θ = θ_old in the update's forward, so taking log π(θ_old) from it
    gives the recompute's loss, gradient, metrics and router update (to float rounding: the
    recompute's separate forward may round its last bit differently). With
    masked_in_denominator=False the IcePop mask (from log π(θ_old)) sets the denominator:
    a wrong θ_old there would change the loss scale, not only its rounding."""
    cfg = dataclasses.replace(LOSS_CFG, masked_in_denominator=masked_in_denominator)
    recompute = jax.jit(rl_step.make_rl_train_step(MODEL, TX, cfg, logprob_chunk=5))
    reuse = jax.jit(rl_step.make_rl_train_step(MODEL, TX, cfg, logprob_chunk=5,
                                               logp_old_from_update=True))
    batch = _batch(3)
    want_state, want = recompute(state, batch)
    got_state, got = reuse(state, batch)
    assert sorted(got) == sorted(want)
    assert 0.0 < float(want["mismatch/masked_frac"]) < 1.0  # the mask is not trivial
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # Adam's first step is lr·sign(grad) where |grad| ≫ ε: the grads agree in sign everywhere.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 got_state, want_state)


def test_logp_old_from_update_needs_a_single_update():
    with pytest.raises(ValueError, match="num_minibatches=1 and num_microbatches=1"):
        rl_step.make_rl_train_step(MODEL, TX, LOSS_CFG, num_minibatches=2,
                                   logp_old_from_update=True)
