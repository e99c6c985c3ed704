"""Shared fixtures of the rollout tests: the tiny MoE model, initialised once per session."""
import dataclasses

import jax
import jax.numpy as jnp
import pytest

from ring_jax.model import Transformer, presets


@pytest.fixture(scope="session")
def tiny_cfg():
    # Dropless dispatch: the naive reference's right-padding must not take expert capacity.
    return dataclasses.replace(presets.get("tiny"), moe_impl="ragged")


@pytest.fixture(scope="session")
def tiny_variables(tiny_cfg):
    return jax.jit(Transformer(tiny_cfg).init)(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 4), jnp.int32))
