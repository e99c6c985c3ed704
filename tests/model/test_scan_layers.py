"""`ModelConfig.scan_layers` runs the MoE layers as one `lax.scan`: the same parameter tree,
logits, router statistics, expert ids and gradients as the Python loop, with and without
remat, router replay and MTP; the cached decode keeps the loop."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax.config import ConfigError
from ring_jax.model import Transformer, init_cache, presets

from .conftest import random_variables

# One dense layer, two MoE layers (the scanned ones), one MTP layer (looped after them).
_CFG = presets.get("tiny", num_layers=3, num_mtp_layers=1, moe_impl="ragged")


@pytest.fixture(scope="module")
def setup():
    tokens_BT = jax.random.randint(jax.random.key(1), (2, 12), 0, _CFG.vocab_size)
    variables = random_variables(_CFG, bias_scale=0.1)
    return tokens_BT, variables


def _forward_and_grads(cfg, variables, tokens_BT, forced=None):
    model = Transformer(cfg)

    def loss(params):
        logits_BTV, aux = model.apply({**variables, "params": params}, tokens_BT,
                                      forced_expert_ids=forced, return_expert_ids=True)
        logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32))
        nll = -jnp.take_along_axis(logp_BTV, tokens_BT[..., None], -1).mean()
        return nll + aux["mtp_logits"].mean() + aux["moe/seq_aux_loss"], (logits_BTV, aux)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


def _assert_same(scanned, looped):
    (loss_s, (logits_s, aux_s)), grads_s = scanned
    (loss_l, (logits_l, aux_l)), grads_l = looped
    np.testing.assert_allclose(loss_s, loss_l, rtol=1e-6)
    np.testing.assert_allclose(logits_s, logits_l, rtol=1e-5, atol=1e-6)
    assert set(aux_s) == set(aux_l)
    np.testing.assert_array_equal(aux_s["expert_ids"], aux_l["expert_ids"])
    for key in ("moe/load", "moe/z_loss", "moe/seq_aux_loss", "moe/dropped_frac"):
        np.testing.assert_allclose(aux_s[key], aux_l[key], rtol=1e-5, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 grads_s, grads_l)


def test_scan_matches_loop_under_remat(setup):
    tokens_BT, variables = setup
    cfg = dataclasses.replace(_CFG, remat_policy="full")
    scan_cfg = dataclasses.replace(cfg, scan_layers=True)
    # Same names and shapes: checkpoints and HF import/export are unaffected.
    shapes = jax.eval_shape(Transformer(scan_cfg).init, jax.random.key(0), tokens_BT)
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)
    jaxprs = [str(jax.make_jaxpr(Transformer(c).apply)(variables, tokens_BT))
              for c in (cfg, scan_cfg)]
    assert "scan[" not in jaxprs[0] and jaxprs[1].count("scan[") == 1
    looped = _forward_and_grads(cfg, variables, tokens_BT)
    _assert_same(_forward_and_grads(scan_cfg, variables, tokens_BT), looped)
    # The MoE layers' gradients differ from each other (each gets its own slice back).
    moe = [looped[1][f"layers_{i}"]["moe"]["gate"] for i in (1, 2)]
    assert not np.allclose(moe[0], moe[1])


def test_scan_matches_loop_under_router_replay(setup):
    """(Without remat: the other test covers `jax.checkpoint` around the scanned layer.)"""
    tokens_BT, variables = setup
    L_moe, (B, T), K = _CFG.num_layers - 1, tokens_BT.shape, _CFG.num_experts_per_tok
    forced_LBTK = jax.random.randint(jax.random.key(2), (L_moe, B, T, K), 0, _CFG.num_experts)
    scan_cfg = dataclasses.replace(_CFG, scan_layers=True)
    scanned = _forward_and_grads(scan_cfg, variables, tokens_BT, forced_LBTK)
    _assert_same(scanned, _forward_and_grads(_CFG, variables, tokens_BT, forced_LBTK))
    np.testing.assert_array_equal(scanned[0][1][1]["expert_ids"], forced_LBTK)


def test_cached_decode_keeps_the_loop(setup):
    tokens_BT, variables = setup
    cache = init_cache(_CFG, tokens_BT.shape[0], 16)
    scan_model = Transformer(dataclasses.replace(_CFG, scan_layers=True))
    assert "scan[" not in str(jax.make_jaxpr(
        lambda v, t, c: scan_model.apply(v, t, cache=c))(variables, tokens_BT, cache))


def test_scan_layers_is_validated():
    with pytest.raises(ConfigError, match="scan_layers=1 is invalid: must be a bool"):
        presets.get("tiny", scan_layers=1)
