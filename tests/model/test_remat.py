"""Per-block rematerialisation (`ModelConfig.remat_policy`) changes memory, never the model: same
parameter tree, same logits, same gradients."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax.config import ConfigError
from ring_jax.model import Transformer, presets


@pytest.fixture(scope="module")
def setup():
    cfg = presets.get("tiny", num_mtp_layers=1)
    tokens_BT = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    variables = jax.jit(Transformer(cfg).init)(jax.random.key(0), tokens_BT)
    return cfg, tokens_BT, variables, _loss_and_grads(cfg, variables, tokens_BT)


def _loss_and_grads(cfg, variables, tokens_BT):
    model = Transformer(cfg)

    def loss(params):
        logits_BTV, aux = model.apply({**variables, "params": params}, tokens_BT)
        logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32))
        return -jnp.take_along_axis(logp_BTV, tokens_BT[..., None], -1).mean() + \
            aux["mtp_logits"].mean()

    return jax.jit(jax.value_and_grad(loss))(variables["params"])


@pytest.mark.parametrize("policy", ["full", pytest.param("save_dots", marks=pytest.mark.slow)])
def test_remat_keeps_parameters_values_and_gradients(setup, policy):
    cfg, tokens_BT, variables, (loss, grads) = setup
    remat_cfg = dataclasses.replace(cfg, remat_policy=policy)
    shapes = jax.eval_shape(Transformer(remat_cfg).init, jax.random.key(0), tokens_BT)
    # Same names and shapes: checkpoints and HF import/export are unaffected.
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)
    remat_loss, remat_grads = _loss_and_grads(remat_cfg, variables, tokens_BT)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 remat_grads, grads)


def test_remat_policy_is_validated():
    with pytest.raises(ConfigError, match="remat_policy='all' is invalid: must be one of"):
        presets.get("tiny", remat_policy="all")
