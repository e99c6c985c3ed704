"""The engine on an 8-device (data × expert) mesh equals the single-device engine."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax import sharding
from ring_jax.model import Transformer, presets
from ring_jax.rollout.engine import Engine, EngineConfig
from ring_jax.rollout.precision import InferencePrecision
from ring_jax.rollout.types import Request, SamplingParams

CONFIG = EngineConfig(num_slots=8, max_len=48, decode_chunk=4, record_expert_ids=True,
                      min_prefill_len=48)


@pytest.fixture(scope="module")
def setup():
    cfg = dataclasses.replace(presets.get("tiny"), moe_impl="ragged")
    variables = jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(0)
    requests = [Request(f"r{i}", rng.integers(0, 512, size=int(rng.integers(1, 20))).astype(
        np.int32), SamplingParams(temperature=0.9, top_p=0.95,
                                  max_new_tokens=int(rng.integers(4, 28))), seed=i)
                for i in range(11)]
    single = Engine.from_model(cfg, variables, CONFIG, InferencePrecision("float32"))
    single.add(requests)
    want = {r.request_id: r for r in single.step().finished}
    return cfg, variables, requests, want


@pytest.mark.parametrize("data, expert", [(2, 4), (4, 2)])
def test_mesh_engine_matches_single_device(setup, data, expert):
    cfg, variables, requests, want = setup
    mesh = sharding.make_mesh(data=data, expert=expert)
    engine = Engine.from_model(cfg, variables, CONFIG, InferencePrecision("float32"), mesh=mesh)
    w_up = engine.variables["params"]["layers_1"]["moe"]["up"]
    assert w_up.sharding.spec[0] == "expert"  # experts really are split
    engine.add(requests[:5])
    out = engine.step(token_budget=20)  # a cut, then resume the rest on the mesh
    engine.add(requests[5:] + engine.drain())
    finished = out.finished + engine.step().finished
    assert sorted(r.request_id for r in finished) == sorted(want)
    for r in finished:
        w = want[r.request_id]
        np.testing.assert_array_equal(r.tokens, w.tokens)
        np.testing.assert_allclose(r.logprobs, w.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(r.expert_ids, w.expert_ids)
