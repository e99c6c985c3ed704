"""Router-bias step: layer order is numeric and the update matches the model's formula."""
import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax.model import update_expert_bias
from ring_jax.train import router_bias


def _router(num_layers=12, experts=4):
    # MoE layers 1..11; as dict keys 'layers_10' sorts before 'layers_2'.
    return {f"layers_{i}": {"moe": {"expert_bias": jnp.full((experts,), float(i))}}
            for i in range(1, num_layers)}


def test_stack_uses_numeric_layer_order():
    bias_LE = router_bias.stack_expert_bias(_router())
    np.testing.assert_array_equal(bias_LE[:, 0], np.arange(1, 12, dtype=np.float32))


def test_update_matches_model_formula_per_layer():
    router = _router()
    load_LE = jnp.asarray(np.random.default_rng(0).integers(0, 9, (11, 4)), jnp.float32)
    new = router_bias.update_router_bias(router, load_LE, rate=0.1)
    want_LE = update_expert_bias(router_bias.stack_expert_bias(router), load_LE, 0.1)
    for i in range(1, 12):
        # Layer i must get load row i-1; a lexicographic order would give layer 10 row 1's.
        np.testing.assert_allclose(new[f"layers_{i}"]["moe"]["expert_bias"], want_LE[i - 1])
    assert router_bias.update_router_bias(router, load_LE, rate=0.0) is router


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="does not match 11 MoE layers x 4 experts"):
        router_bias.update_router_bias(_router(), jnp.zeros((2, 4)), rate=0.1)
