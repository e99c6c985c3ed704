"""Full-sequence forward: packed segments, router replay, aux statistics, hidden output, dense
and MTP variants."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax.model import Transformer, init_cache, presets
from tests.model.conftest import random_variables


@pytest.fixture(scope="module")
def tiny(tiny_variables):
    cfg = presets.get("tiny")
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 1, cfg.vocab_size)
    variables = tiny_variables
    apply = jax.jit(model.apply, static_argnames=("return_expert_ids", "return_hidden"))
    return cfg, model, tokens, variables, apply


def test_init_layout():
    cfg = presets.get("tiny")
    variables = jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                               jnp.ones((1, 2), jnp.int32))
    assert set(variables) == {"params", "router"}
    assert variables["params"]["lm_head"]["kernel"].shape == (cfg.hidden_size, cfg.vocab_size)
    biases = jax.tree.leaves(variables["router"])
    assert len(biases) == cfg.num_moe_layers and biases[0].shape == (cfg.num_experts,)


def test_packed_segments_equal_separate_sequences(tiny):
    cfg, _, tokens, variables, apply = tiny
    # Row 0 packs sequence a (5 tokens) and b (4 tokens) + 3 padding tokens; rows 1 and 2 hold
    # a and b alone (padded at the end, which causal attention never lets them see).
    a, b = tokens[0, :5], tokens[1, :4]
    pad = lambda x: jnp.concatenate([x, jnp.zeros(12 - x.shape[0], jnp.int32)])
    rows = jnp.stack([pad(jnp.concatenate([a, b])), pad(a), pad(b)])
    seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3, [1] * 5 + [0] * 7, [1] * 4 + [0] * 8],
                      jnp.int32)
    pos = jnp.asarray([list(range(5)) + list(range(4)) + [0] * 3, list(range(12)),
                       list(range(12))], jnp.int32)
    logits, aux = apply(variables, rows, positions_BT=pos, segment_ids_BT=seg)
    np.testing.assert_allclose(np.asarray(logits[0, :5]), np.asarray(logits[1, :5]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits[0, 5:9]), np.asarray(logits[2, :4]), atol=1e-5)
    # Padding (segment 0) is excluded from the expert load: 2 x 9 real tokens x K.
    assert float(aux["moe/load"].sum()) == 18 * cfg.num_experts_per_tok


def test_router_replay(tiny):
    cfg, _, tokens, variables, apply = tiny
    logits, aux = apply(variables, tokens, return_expert_ids=True)
    ids = aux["expert_ids"]
    assert ids.shape == (cfg.num_moe_layers, 2, 12, cfg.num_experts_per_tok)
    replay, aux2 = apply(variables, tokens, forced_expert_ids=ids, return_expert_ids=True)
    np.testing.assert_allclose(np.asarray(replay), np.asarray(logits), atol=1e-6)
    # Forcing other experts changes the output, and the forced ids are what is reported.
    other = (ids + 1) % cfg.num_experts
    forced, aux3 = apply(variables, tokens, forced_expert_ids=other, return_expert_ids=True)
    np.testing.assert_array_equal(np.asarray(aux3["expert_ids"]), np.asarray(other))
    assert np.abs(np.asarray(forced) - np.asarray(logits)).max() > 1e-3


def test_aux_and_hidden(tiny):
    cfg, _, tokens, variables, apply = tiny
    logits, aux = apply(variables, tokens)
    assert aux["moe/load"].shape == (cfg.num_moe_layers, cfg.num_experts)
    assert float(aux["moe/load"].sum()) == tokens.size * cfg.num_experts_per_tok
    assert float(aux["moe/z_loss"]) > 0 and float(aux["moe/dropped_frac"]) == 0.0
    hidden, _ = apply(variables, tokens, return_hidden=True)
    kernel = variables["params"]["lm_head"]["kernel"]
    np.testing.assert_allclose(np.asarray(hidden @ kernel), np.asarray(logits), atol=1e-5)


def test_expert_bias_is_not_a_gradient_parameter(tiny):
    _, model, tokens, variables, _ = tiny
    grads = jax.jit(jax.grad(lambda p: model.apply(
        {"params": p, "router": variables["router"]}, tokens)[0].sum()))(variables["params"])
    assert "expert_bias" not in str(jax.tree_util.tree_structure(grads))
    assert float(jnp.abs(grads["layers_1"]["moe"]["router"]).max()) > 0


@pytest.mark.parametrize("overrides", [dict(num_experts=0), dict(num_mtp_layers=2)])
def test_dense_and_mtp_variants(overrides):
    cfg = presets.get("tiny", **overrides)
    model = Transformer(cfg)
    tokens = jnp.ones((1, 6), jnp.int32)
    variables = random_variables(cfg)
    logits, aux = jax.jit(model.apply)(variables, tokens)
    assert logits.shape == (1, 6, cfg.vocab_size) and np.isfinite(np.asarray(logits)).all()
    if cfg.num_mtp_layers:
        assert aux["mtp_logits"].shape == (2, 1, 6, cfg.vocab_size)
        # One load row per 'router' bias leaf: main MoE layers, then the MTP blocks.
        assert aux["moe/load"].shape == (cfg.num_moe_layers + 2, cfg.num_experts)
        assert len(jax.tree.leaves(variables["router"])) == cfg.num_moe_layers + 2
        assert {"layers_2", "layers_3"} <= set(variables["params"])
        # Decode (with a cache) skips the MTP head.
        _, aux_decode, _ = jax.jit(lambda v, t, c: model.apply(v, t, cache=c))(
            variables, tokens, init_cache(cfg, 1, 8))
        assert "mtp_logits" not in aux_decode
        assert aux_decode["moe/load"].shape == (cfg.num_moe_layers, cfg.num_experts)
    else:
        assert aux["moe/load"].shape == (0, 0) and "router" not in variables


def test_bfloat16_compute_close_to_float32(tiny):
    cfg, _, tokens, variables, apply = tiny
    logits, _ = apply(variables, tokens)
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables["params"])
    logits16, aux16 = jax.jit(Transformer(cfg16).apply)(
        {"params": params16, "router": variables["router"]}, tokens)
    assert logits16.dtype == jnp.bfloat16
    # bf16 has ~3 significant digits; a wrong cast (e.g. router in bf16 flipping experts
    # everywhere, or a dropped norm) would move logits by O(1).
    err = np.abs(np.asarray(logits16, np.float32) - np.asarray(logits))
    assert err.max() < 0.1 * np.abs(np.asarray(logits)).max()
