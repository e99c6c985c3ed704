"""The RL train step: a pure `rl_train_step(state, batch) -> (state, metrics)` (PAPER §1).

One step consumes one scheduler batch (rows of prompt ‖ response, `ring_jax.scheduler.batching`):

  1. log π_train(θ_old): one forward at the weights that start the step, on the whole batch.
     It is both the PPO ratio's denominator and the numerator of the IcePop ratio
     k = π_train(θ_old) / π_infer(θ_old) against the engine's recorded log-probs.
  2. ``num_minibatches`` optimizer updates, each on a slice of the rows (`jax.lax.scan`), with
     the policy loss of `ring_jax.rl.losses` (correction chosen by name: none / tis / icepop /
     kpop / ...). The minibatch loss is its loss sum over the minibatch's own denominator.
     With ``num_microbatches`` > 1 its gradient is accumulated over row slices (less
     activation memory, the same update: the loss is a sum over rows).
  3. The aux-loss-free router-bias update (PAPER §4) from the expert loads of step 1's forward,
     outside the gradient.

With ``logp_old_from_update`` step 1 is skipped: with one minibatch and one microbatch the only
update's forward runs at θ_old itself, so log π_train(θ_old) is its own log-prob under
`stop_gradient` — the same value (the ratio π_θ/π_θold of PAPER eq. 1 is then exactly 1, where a
separate recompute gives 1 up to float rounding), the same gradient, the same expert loads, one
forward fewer. Exact only under that condition (``RLConfig`` rejects anything else): a second
minibatch's θ has moved, and microbatches need the whole minibatch's IcePop mask up front.

The state is the same dict as the SFT stage's ({"step", "params", "opt_state", "router"}), so an
SFT checkpoint initialises RL by name. Router replay (R3): with ``router_replay`` the batch's
``expert_ids_BTLK`` (the engine's routing) is forced in every training forward; positions holding
-1 (prompt, padding) keep the trainer's own routing.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from ring_jax.rl import logprobs as logprobs_lib
from ring_jax.rl import losses
from ring_jax.train import integrity, optim
from ring_jax.train import router_bias

RLState = dict  # {"step", "params", "opt_state", "router"}
Batch = Mapping[str, jax.Array]


def _valid_inputs_BT(loss_mask_BT: jax.Array) -> jax.Array:
    """int32 [B, T]: 1 on the row's real tokens (prompt ‖ response), 0 on the padding after.

    The last real input is the one whose target is the last response token, at the last index
    where ``loss_mask`` is 1; everything up to it is real. Used as the segment ids, so padding
    neither attends nor counts in the router's expert loads.
    """
    T = loss_mask_BT.shape[1]
    last_B = jnp.max(jnp.where(loss_mask_BT > 0, jnp.arange(T)[None, :], -1), axis=1)
    return (jnp.arange(T)[None, :] <= last_B[:, None]).astype(jnp.int32)


def make_logprob_fn(model, *, chunk_size: int, router_replay: bool
                    ) -> Callable[[Any, Any, Batch], tuple[jax.Array, jax.Array, dict]]:
    """``f(params, router, batch) -> (logp_BT, entropy_BT, aux)`` of the batch's targets.

    The LM head is applied chunk by chunk (`ring_jax.rl.logprobs`), so [B, T, V] fp32 logits
    never exist whole.
    """

    def logprob_fn(params, router, batch):
        segment_ids_BT = _valid_inputs_BT(batch["loss_mask_BT"])
        forced = None
        if router_replay:
            # [B, T, L, K] -> [L, B, T, K]; -1 entries fall back to the trainer's routing.
            forced = jnp.transpose(batch["expert_ids_BTLK"], (2, 0, 1, 3))
        hidden_BTD, aux = model.apply({"params": params, "router": router}, batch["tokens_BT"],
                                      segment_ids_BT=segment_ids_BT, forced_expert_ids=forced,
                                      return_hidden=True)
        logp_BT, entropy_BT = logprobs_lib.token_logprobs_and_entropy(
            hidden_BTD, params["lm_head"]["kernel"], batch["targets_BT"],
            chunk_size=chunk_size)
        return logp_BT, entropy_BT, aux

    return logprob_fn


def _split_rows(tree: Any, num_pieces: int) -> Any:
    """[B, ...] -> [num_pieces, B / num_pieces, ...] for every leaf."""
    return jax.tree.map(lambda x: x.reshape(num_pieces, x.shape[0] // num_pieces,
                                            *x.shape[1:]), tree)


def _accumulated_value_and_grad(loss_fn, params, piece, num_microbatches: int):
    """``value_and_grad(loss_fn)(params, piece)`` in ``num_microbatches`` row slices, one after
    another (activation memory of one slice). The loss is a sum over rows divided by the whole
    minibatch's denominator, so slice losses and gradients add up to the full ones; gradients
    accumulate in float32."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_microbatches == 1:
        return grad_fn(params, piece)

    def add(carry, micro):
        loss_sum, grads_sum = carry
        (loss, terms), grads = grad_fn(params, micro)
        grads_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_sum, grads)
        return (loss_sum + loss, grads_sum), terms

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss, grads), terms_U = jax.lax.scan(add, (jnp.zeros((), jnp.float32), zeros),
                                          _split_rows(piece, num_microbatches))
    terms = jax.tree.map(lambda x: x[0], terms_U)
    for i in range(1, num_microbatches):
        terms = losses.accumulate_terms(terms, jax.tree.map(lambda x, i=i: x[i], terms_U))
    return (loss, terms), jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)


def make_rl_train_step(model, tx: optax.GradientTransformation, loss_cfg: losses.LossConfig, *,
                       num_minibatches: int = 1, router_bias_rate: float = 1e-3,
                       router_replay: bool = False, logprob_chunk: int = 128,
                       optim_cfg: optim.OptimConfig | None = None, num_microbatches: int = 1,
                       logp_old_from_update: bool = False
                       ) -> Callable[[RLState, Batch], tuple[RLState, dict[str, jax.Array]]]:
    """Builds the pure train step (jit it with ``donate_argnums=0``). Each minibatch's
    gradient is computed in ``num_microbatches`` slices (same update, less memory).
    ``logp_old_from_update`` (needs one minibatch and one microbatch) takes log π_train(θ_old)
    from the update's own forward instead of a separate one (module docstring)."""
    if logp_old_from_update and (num_minibatches, num_microbatches) != (1, 1):
        raise ValueError(
            f"logp_old_from_update=True is exact only with num_minibatches=1 and "
            f"num_microbatches=1, got {num_minibatches} and {num_microbatches}")
    logprob_fn = make_logprob_fn(model, chunk_size=logprob_chunk, router_replay=router_replay)

    def rl_train_step(state: RLState, batch: Batch):
        router = state["router"]
        if logp_old_from_update:
            return _step_reusing_forward(state, batch)
        # 1. log π_train(θ_old) on the whole batch: a constant of every minibatch update.
        logp_old_BT, _, aux_old = logprob_fn(state["params"], router, batch)
        logp_old_BT = jax.lax.stop_gradient(logp_old_BT)
        inputs = {"batch": dict(batch), "logp_old_BT": logp_old_BT}
        pieces = _split_rows(inputs, num_minibatches)

        # 2. One optimizer update per minibatch.
        def update(carry, piece):
            params, opt_state = carry
            mb = piece["batch"]
            keep_BT = None if loss_cfg.masked_in_denominator else losses.kept_tokens(
                piece["logp_old_BT"], mb["logp_infer_BT"], mb["loss_mask_BT"], loss_cfg)
            denominator = losses.loss_denominator(mb["loss_mask_BT"], loss_cfg, keep_BT)

            def loss_fn(p, micro):
                # The entropy has a gradient here: the optional entropy bonus acts on θ.
                mb = micro["batch"]
                logp_BT, entropy_BT, _ = logprob_fn(p, router, mb)
                terms = losses.policy_loss_terms(
                    logp_BT, micro["logp_old_BT"], mb["logp_infer_BT"], mb["advantages_B"],
                    mb["loss_mask_BT"], loss_cfg, entropy_BT=entropy_BT)
                return terms.loss_sum / jnp.maximum(denominator, 1.0), terms

            (loss, terms), grads = _accumulated_value_and_grad(loss_fn, params, piece,
                                                               num_microbatches)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), (loss, terms, optax.global_norm(grads))

        (params, opt_state), (loss_M, terms_M, grad_norm_M) = jax.lax.scan(
            update, (state["params"], state["opt_state"]), pieces)
        return _finish(state, batch, params, opt_state, aux_old, loss_M, terms_M, grad_norm_M)

    def _step_reusing_forward(state: RLState, batch: Batch):
        """One update whose own forward, at θ_old, also gives log π_train(θ_old)."""
        router = state["router"]
        mb = dict(batch)

        def loss_fn(p):
            logp_BT, entropy_BT, aux = logprob_fn(p, router, mb)
            logp_old_BT = jax.lax.stop_gradient(logp_BT)  # θ = θ_old here, bit for bit
            keep_BT = None if loss_cfg.masked_in_denominator else losses.kept_tokens(
                logp_old_BT, mb["logp_infer_BT"], mb["loss_mask_BT"], loss_cfg)
            denominator = losses.loss_denominator(mb["loss_mask_BT"], loss_cfg, keep_BT)
            terms = losses.policy_loss_terms(
                logp_BT, logp_old_BT, mb["logp_infer_BT"], mb["advantages_B"],
                mb["loss_mask_BT"], loss_cfg, entropy_BT=entropy_BT)
            return terms.loss_sum / jnp.maximum(denominator, 1.0), (terms, aux)

        (loss, (terms, aux_old)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # The leading minibatch axis (M = 1) the scan of the other path gives its outputs.
        loss_M, terms_M, grad_norm_M = jax.tree.map(
            lambda x: jnp.expand_dims(x, 0), (loss, terms, optax.global_norm(grads)))
        return _finish(state, batch, params, opt_state, aux_old, loss_M, terms_M, grad_norm_M)

    def _finish(state, batch, params, opt_state, aux_old, loss_M, terms_M, grad_norm_M):
        """The router-bias update, the metrics and the new state after the updates."""
        # 3. Aux-loss-free balancing from this batch's expert loads at θ_old (PAPER §4).
        new_router = router_bias.update_router_bias(state["router"], aux_old["moe/load"],
                                                    router_bias_rate)

        # Metrics of the union of the minibatches (sums add, maxima max).
        total = jax.tree.map(lambda x: x[0], terms_M)
        for i in range(1, loss_M.shape[0]):
            total = losses.accumulate_terms(total, jax.tree.map(lambda x, i=i: x[i], terms_M))
        metrics = dict(losses.finalize_metrics(total))
        load_LE = aux_old["moe/load"]
        metrics.update({
            "train/loss": loss_M.mean(),
            "train/grad_norm": grad_norm_M.mean(),
            "train/grad_norm_max": grad_norm_M.max(),
            "train/skipped_steps": optim.skipped_steps(opt_state),
            "train/params_finite": integrity.all_finite(params).astype(jnp.float32),
            "train/response_tokens": batch["loss_mask_BT"].sum(),
            "rl/reward_mean": _row_mean(batch["rewards_B"], batch["loss_mask_BT"]),
            "rl/advantage_abs_mean": _row_mean(jnp.abs(batch["advantages_B"]),
                                               batch["loss_mask_BT"]),
            "moe/dropped_frac": aux_old["moe/dropped_frac"],
            # Max over layers of (most loaded expert / mean load): 1 = perfectly balanced.
            "moe/max_load_ratio": jnp.max(load_LE.max(-1) / jnp.maximum(load_LE.mean(-1), 1e-9))
            if load_LE.size else jnp.zeros(()),
        })
        if optim_cfg is not None:
            metrics["train/lr"] = optim.current_learning_rate(optim_cfg, state["opt_state"])
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                     "router": new_router}
        return new_state, metrics

    return rl_train_step


def jit_rl_train_step(model, tx: optax.GradientTransformation, rl_cfg: Any) -> Callable:
    """The jitted train step as `rl_loop` runs it (and `ring_jax.plan` compiles it), built from
    an ``RLConfig`` (`ring_jax.train.experiment`). The state is donated when
    ``rl_cfg.donate_state`` (the new state takes the old one's buffers); its caller must then
    keep no other reference to the state's arrays (`rl_loop` gives the engine copies,
    `train.donation.unaliased`)."""
    step_fn = make_rl_train_step(
        model, tx, rl_cfg.loss, num_minibatches=rl_cfg.num_minibatches,
        router_bias_rate=rl_cfg.router_bias_rate, router_replay=rl_cfg.router_replay,
        logprob_chunk=rl_cfg.logprob_chunk, optim_cfg=rl_cfg.optim,
        num_microbatches=rl_cfg.num_microbatches,
        logp_old_from_update=rl_cfg.logp_old_from_update)
    return jax.jit(step_fn, donate_argnums=(0,) if rl_cfg.donate_state else ())


def _row_mean(values_B: jax.Array, loss_mask_BT: jax.Array) -> jax.Array:
    """Mean of a per-row value over the batch's real (non-padding) rows."""
    real_B = (loss_mask_BT.sum(-1) > 0).astype(jnp.float32)
    return (values_B * real_B).sum() / jnp.maximum(real_B.sum(), 1.0)
