"""Fast variable creation for model tests: `Transformer.init` under jit costs ~10 s of XLA
compile on these machines (the forward pass + RNG), so tests take the shapes from
`jax.eval_shape(init)` and fill them with numpy random values instead."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax.model import Transformer, presets


def random_variables(cfg, seed=0, bias_scale=0.0):
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 2), jnp.int32))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "expert_bias" in name:
            value = rng.uniform(-bias_scale, bias_scale, s.shape)
        elif "scale" in name:  # RMSNorm weights near 1
            value = 1.0 + 0.1 * rng.standard_normal(s.shape)
        else:
            value = cfg.initializer_range * rng.standard_normal(s.shape) * 5
        return jnp.asarray(value, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="session")
def tiny_variables():
    return random_variables(presets.get("tiny"))
