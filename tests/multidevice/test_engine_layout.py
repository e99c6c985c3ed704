"""The engine's KV cache split over the mesh axes its slots cannot use (`rollout.layout`): the
cache really is split along its length, the decode moves no whole-length cache between devices,
and the rollouts (prefilled in chunks) equal one device's (unchunked) token for token (fp32)."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ring_jax import sharding
from ring_jax.model import Transformer, presets
from ring_jax.rollout.engine import Engine, EngineConfig
from ring_jax.rollout.precision import InferencePrecision
from ring_jax.rollout.types import Request, SamplingParams

MAX_LEN = 48  # no other array of the tiny model has a dimension of 48 (checked below)
_COLLECTIVE = re.compile(r"= (.*?) (all-gather|all-to-all|all-reduce|reduce-scatter|"
                         r"collective-permute)(-start)?\(")


def _config(num_slots, prefill_chunk=0):
    return EngineConfig(num_slots=num_slots, max_len=MAX_LEN, decode_chunk=4,
                        record_expert_ids=True, min_prefill_len=MAX_LEN,
                        prefill_chunk=prefill_chunk)


@pytest.fixture(scope="module")
def setup():
    cfg = dataclasses.replace(presets.get("tiny"), moe_impl="ragged")
    variables = jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(1)
    requests = [Request(f"r{i}", rng.integers(0, 512, size=int(rng.integers(1, 20))).astype(
        np.int32), SamplingParams(temperature=0.9, top_p=0.95,
                                  max_new_tokens=int(rng.integers(4, 28))), seed=i)
                for i in range(7)]
    single = Engine.from_model(cfg, variables, _config(4), InferencePrecision("float32"))
    single.add(requests)
    want = {r.request_id: r for r in single.step().finished}
    return cfg, variables, requests, want


# (mesh, slots): 4 slots on fsdp 2 x expert 4 take expert (1 per chip) and split the length over
# fsdp; 2 slots on fsdp 4 x expert 2 take expert and split the length 4 ways (swapped axes).
@pytest.mark.parametrize("fsdp, expert, num_slots, spec, shard", [
    (2, 4, 4, P(("data", "expert"), "tensor", "fsdp", None), (1, 2, 24, 16)),
    pytest.param(4, 2, 2, P(("data", "expert"), "tensor", "fsdp", None), (1, 2, 12, 16),
                 marks=pytest.mark.slow),  # ~40 s more on 2 loaded cores
])
def test_cache_length_split_and_rollouts_equal_one_device(setup, fsdp, expert, num_slots, spec,
                                                          shard):
    cfg, variables, requests, want = setup
    mesh = sharding.make_mesh(fsdp=fsdp, expert=expert)
    # Chunked prefill (16 of the 48 positions at a time) writes into the split cache too.
    engine = Engine.from_model(cfg, variables, _config(num_slots, prefill_chunk=16),
                               InferencePrecision("float32"), mesh=mesh)
    k = engine._state.cache[0]["k"]  # the engine's slot state: [slots, kv heads, length, Q]
    assert k.sharding.spec == spec
    # Each device holds a slice of the length (the old prefix rule kept it whole, replicated).
    assert {s.data.shape for s in k.addressable_shards} == {shard}

    engine.add(requests[:3])
    out = engine.step(token_budget=12)  # a cut mid-flight, then the rest, resumed
    engine.add(requests[3:] + engine.drain())
    finished = out.finished + engine.step().finished
    assert sorted(r.request_id for r in finished) == sorted(want)
    for r in finished:
        w = want[r.request_id]
        np.testing.assert_array_equal(r.tokens, w.tokens)
        # The softmax over a split length sums in another order: equal up to float rounding.
        np.testing.assert_allclose(r.logprobs, w.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(r.expert_ids, w.expert_ids)

    # The decode moves no whole-length cache between devices: only the softmax's statistics,
    # partial outputs and the new token's k/v (a partitioner that all-gathered the cache to
    # write or read it would show a collective with a dimension of MAX_LEN).
    # (Lowered under the mesh, as the engine runs it: outside, the model's constraints and the
    # MoE's shard_map are off.) Checked to fail with the forward under the training rules (the
    # cache all-gathered whole) and with the length left out of the rules.
    with sharding.use_mesh(mesh):
        hlo = engine._decode.lower(engine.variables, engine._state, np.int32(4),
                                   np.int32(5)).compile().as_text()
    shapes = [m.group(1) for m in _COLLECTIVE.finditer(hlo)]
    assert shapes, "no collectives parsed: the HLO text format changed"
    dims = {int(d) for s in shapes for dd in re.findall(r"\[([\d,]*)\]", s)
            for d in dd.split(",") if d}
    assert MAX_LEN not in dims, shapes
