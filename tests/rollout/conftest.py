"""Shared fixtures of the rollout tests: the tiny MoE model, initialised once per session."""
import dataclasses

import jax
import jax.numpy as jnp
import pytest

from ring_jax.model import Transformer, presets
from ring_jax.rollout.engine import Engine, EngineConfig
from ring_jax.rollout.precision import InferencePrecision

MAX_LEN = 64


@pytest.fixture(scope="session")
def tiny_cfg():
    # Dropless dispatch: the naive reference's right-padding must not take expert capacity.
    return dataclasses.replace(presets.get("tiny"), moe_impl="ragged")


@pytest.fixture(scope="session")
def tiny_variables(tiny_cfg):
    return jax.jit(Transformer(tiny_cfg).init)(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 4), jnp.int32))


def _make_engine(cfg, variables, dtype):
    # 4 slots: 6-request tests refill slots; one prompt bucket (min_prefill_len = max_len).
    config = EngineConfig(num_slots=4, max_len=MAX_LEN, decode_chunk=4, record_expert_ids=True,
                          min_prefill_len=MAX_LEN)
    return Engine.from_model(cfg, variables, config, InferencePrecision(dtype))


@pytest.fixture(scope="session")
def fp32_engine(tiny_cfg, tiny_variables):
    """One compiled float32 engine shared by the rollout tests (drain it before use)."""
    return _make_engine(tiny_cfg, tiny_variables, "float32")


@pytest.fixture(scope="session")
def make_engine():
    """``make_engine(cfg, variables, dtype)``: an engine configured like `fp32_engine`."""
    return _make_engine
