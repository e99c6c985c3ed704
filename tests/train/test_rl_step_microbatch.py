"""Micro-batches inside the step (`rl.num_microbatches`): the same update and metrics as the
whole minibatch at once, in a fraction of the activation memory."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax.config import ConfigError
from ring_jax.model import Transformer, presets
from ring_jax.rl import losses
from ring_jax.train import experiment, optim, rl_step

B, T = 4, 10
CFG = dataclasses.replace(presets.get("tiny"), moe_impl="reference")
MODEL = Transformer(CFG)
TX = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2, clip_norm=1.0))


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
    loss_mask = np.zeros((B, T), np.float32)
    for b, (p, r) in enumerate([(3, 5), (4, 3), (2, 7), (5, 2)]):
        loss_mask[b, p - 1:p + r - 1] = 1.0
        tokens[b, p + r:] = 0
    return {"tokens_BT": tokens,
            "targets_BT": np.concatenate([tokens[:, 1:], np.zeros((B, 1), np.int32)], 1),
            "loss_mask_BT": loss_mask,
            "logp_infer_BT": (-rng.uniform(0.5, 8.0, (B, T)) * loss_mask).astype(np.float32),
            "advantages_B": np.array([1.0, -1.0, 0.5, -0.5], np.float32),
            "rewards_B": np.array([1.0, 0.0, 1.0, 0.0], np.float32)}


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
def test_microbatched_step_equals_whole_minibatch(aggregation):
    loss_cfg = losses.LossConfig(correction="icepop", alpha=0.5, beta=5.0,
                                 aggregation=aggregation)
    variables = jax.jit(MODEL.init)(jax.random.key(0), jnp.zeros((1, T), jnp.int32))
    state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
             "opt_state": TX.init(variables["params"]), "router": variables["router"]}
    out = {}
    for micro in (1, 2):
        step = jax.jit(rl_step.make_rl_train_step(MODEL, TX, loss_cfg, logprob_chunk=4,
                                                  num_microbatches=micro))
        out[micro] = step(state, _batch())
    (whole, whole_metrics), (sliced, sliced_metrics) = out[1], out[2]
    # AdamW's first update is ≈ lr · g / |g|: float-summation noise on a near-zero gradient
    # entry moves it by up to ~1e-5 (lr = 1e-2); a wrong slice weighting would move it by ~lr.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5),
                 sliced["params"], whole["params"])
    for key in ("train/loss", "train/grad_norm", "mismatch/masked_frac", "rl/reward_mean"):
        np.testing.assert_allclose(sliced_metrics[key], whole_metrics[key], rtol=1e-5)


def test_microbatches_must_divide_the_minibatch():
    with pytest.raises(ConfigError, match="rl.num_microbatches=3 is invalid: must divide"):
        experiment.from_config_dict({"rl": {"num_minibatches": 2, "num_microbatches": 3},
                                     "scheduler": {"batch_size": 64, "group_size": 8},
                                     "engine": {"max_len": 1024}})
