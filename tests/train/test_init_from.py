"""Initialising RL from a local HF checkpoint: same weights back, architecture mismatch named."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax.config import ConfigError
from ring_jax.model import Transformer, hf, presets
from ring_jax.train import rl_loop

CFG = presets.get("tiny")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    variables = jax.jit(Transformer(CFG).init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))
    path = str(tmp_path_factory.mktemp("hf"))
    hf.save(path, CFG, jax.device_get(variables), layout="glm4_moe")
    return path, variables


def test_load_hf_returns_the_saved_weights(checkpoint_dir):
    path, variables = checkpoint_dir
    loaded = rl_loop._load_hf(path, dataclasses.replace(CFG, moe_impl="reference"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 loaded, jax.device_get(variables))


def test_load_hf_names_architecture_mismatch(checkpoint_dir):
    path, _ = checkpoint_dir
    with pytest.raises(ConfigError, match=r"model.num_layers=3 but the checkpoint has 2"):
        rl_loop._load_hf(path, dataclasses.replace(CFG, num_layers=3))
