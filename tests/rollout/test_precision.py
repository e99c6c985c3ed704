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
