"""Inference precision policy: casting, fp8 fake quantization, router-weight noise."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax import config as config_lib
from ring_jax.rollout import precision as precision_lib
from ring_jax.rollout.precision import InferencePrecision


@pytest.fixture
def variables(tiny_variables):
    return tiny_variables


def test_config_validation():
    with pytest.raises(config_lib.ConfigError, match="dtype"):
        InferencePrecision(dtype="float8")
    with pytest.raises(config_lib.ConfigError, match="router_noise_std"):
        InferencePrecision(router_noise_std=-0.1)


def test_fp8_round_trip_hand_checked():
    # Channel max 448 maps to scale 1: e4m3 has 3 mantissa bits, so 1.0625 rounds to 1.0 and
    # 1.125 (representable) survives; 0 stays 0.
    w = jnp.array([[448.0, 1.0], [1.0625, 2.0], [1.125, 0.0]])  # reduce over axis 0
    q = precision_lib.fake_quantize_fp8(w, reduce_axis=0)
    np.testing.assert_allclose(q[:, 0], [448.0, 1.0, 1.125])
    # Second channel: max 2 → scale 2/448; values exactly representable after scaling.
    np.testing.assert_allclose(q[:, 1], [1.0, 2.0, 0.0], rtol=1e-6)


def test_fp8_relative_error_is_bounded_by_e4m3_precision():
    w = jax.random.normal(jax.random.PRNGKey(1), (4, 64, 16))
    q = precision_lib.fake_quantize_fp8(w, reduce_axis=1)
    amax = jnp.max(jnp.abs(w), axis=1, keepdims=True)
    # Normal e4m3 numbers have relative spacing 2^-3 (error ≤ 2^-4); subnormals (below
    # 2^-6 of the max range) have absolute spacing 2^-9 of scale.
    bound = jnp.maximum(jnp.abs(w) * 2.0**-4, amax / 448 * 2.0**-10)
    assert bool(jnp.all(jnp.abs(q - w) <= bound * 1.0001))
    assert not bool(jnp.all(q == w))


def test_bf16_policy_casts_params_and_keeps_router_bias_fp32(variables):
    out = precision_lib.prepare_variables(variables, InferencePrecision(), 0)
    dtypes = {x.dtype for x in jax.tree.leaves(out["params"])}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(out["router"])} == {jnp.dtype(jnp.float32)}


def _changed(a, b):
    return {jax.tree_util.keystr(p) for (p, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)) if not bool(jnp.all(x == y))}


def test_fp8_touches_only_routed_expert_weights(variables):
    base = precision_lib.prepare_variables(variables, InferencePrecision("float32"), 0)
    fp8 = precision_lib.prepare_variables(
        variables, InferencePrecision("float32", fp8_expert_weights=True), 0)
    assert _changed(base, fp8) == {f"['params']['layers_1']['moe']['{n}']"
                                   for n in ("gate", "up", "down")}


def test_router_noise_touches_only_router_weights_and_depends_on_version(variables):
    noisy = InferencePrecision("float32", router_noise_std=0.5)
    a0 = precision_lib.prepare_variables(variables, noisy, 0)
    a0_again = jax.jit(precision_lib.prepare_variables, static_argnums=1)(variables, noisy, 0)
    a1 = precision_lib.prepare_variables(variables, noisy, 1)
    router = "['params']['layers_1']['moe']['router']"
    assert _changed(variables, a0) == {router}
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-7), a0, a0_again)
    assert _changed(a0, a1) == {router}
    # Induced logit noise ≈ σ · rms(h) for a unit-RMS input.
    h = jax.random.normal(jax.random.PRNGKey(2), (4096, 64))
    delta = a0["params"]["layers_1"]["moe"]["router"] - variables["params"]["layers_1"]["moe"][
        "router"]
    np.testing.assert_allclose(jnp.std(h @ delta), 0.5, rtol=0.15)


def test_expert_scale_error_is_per_expert_fixed_per_run_and_relative(variables):
    knob = InferencePrecision("float32", expert_scale_error_std=0.1)
    a0 = precision_lib.prepare_variables(variables, knob, 0)
    a7 = precision_lib.prepare_variables(variables, knob, 7)
    moe = "['params']['layers_1']['moe']"
    assert _changed(variables, a0) == {f"{moe}['{n}']" for n in ("router", "gate", "up", "down")}
    assert _changed(a0, a7) == set()  # systematic: the same error at every policy version
    other = precision_lib.prepare_variables(
        variables, InferencePrecision("float32", expert_scale_error_std=0.1,
                                      expert_scale_error_seed=1), 0)
    assert _changed(a0, other) == _changed(variables, a0)
    # One factor per expert: the ratio engine/trainer is constant within expert e's slice
    # (router column e; gate[e]) and ≈ 1 + 0.1·N(0, 1) across experts.
    w = variables["params"]["layers_1"]["moe"]
    ratio_E = a0["params"]["layers_1"]["moe"]["router"] / w["router"]
    np.testing.assert_allclose(ratio_E, np.broadcast_to(ratio_E[:1], ratio_E.shape), rtol=1e-5)
    gate_ratio = a0["params"]["layers_1"]["moe"]["gate"] / w["gate"]
    np.testing.assert_allclose(gate_ratio, gate_ratio[:, :1, :1] * np.ones_like(gate_ratio),
                               rtol=1e-5)
    assert 0.0 < float(jnp.std(gate_ratio[:, 0, 0])) < 0.3
    with pytest.raises(config_lib.ConfigError, match="expert_scale_error_std"):
        InferencePrecision(expert_scale_error_std=-0.1)


def test_expert_scale_error_gap_grows_with_the_weights_scale(tiny_cfg, variables):
    # fp32 engine weights, so the knob is the only difference from the trainer. Scaling the MoE
    # weights (what training does as it sharpens the router and grows the experts) by c grows
    # the engine-trainer |Δlogp|; without the knob it stays exactly 0. A parameter-independent
    # error (or one redrawn per version) would not grow with c.
    from ring_jax.model import Transformer
    model = Transformer(tiny_cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 48), 0, 256)

    @jax.jit
    def logp(v):
        logits, _ = model.apply(v, tokens)
        lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        return jnp.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]

    def scaled(c):
        def scale(path, w):
            names = precision_lib._path_names(path)
            moe_weight = names[-2:-1] == ("moe",) and names[-1] in ("router", "gate", "up", "down")
            return w * c if moe_weight else w
        return {**variables, "params": jax.tree_util.tree_map_with_path(scale, variables["params"])}

    def gap(c, std):
        v = scaled(c)
        engine = precision_lib.prepare_variables(
            v, InferencePrecision("float32", expert_scale_error_std=std), 0)
        return float(jnp.abs(logp(v) - logp(engine)).mean())

    assert gap(1, 0.0) == gap(9, 0.0) == 0.0
    g1, g3, g9 = gap(1, 0.1), gap(3, 0.1), gap(9, 0.1)
    assert 0.0 < g1 < g3 < g9, (g1, g3, g9)
    assert g3 > 3 * g1
