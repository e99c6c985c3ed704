"""Chunked prefill (`EngineConfig.prefill_chunk`): prompts go through the model a chunk at a time
inside the prefill program; the rollouts equal the full-recompute reference (float32:
token-exact), and the program's temporaries shrink with the chunk."""
import jax
import jax.numpy as jnp
import pytest

from ring_jax.config import ConfigError
from ring_jax.model import Transformer
from ring_jax.rollout import engine as engine_lib, reference
from ring_jax.rollout.engine import Engine, EngineConfig
from ring_jax.rollout.precision import InferencePrecision

from tests.rollout.test_engine import MAX_LEN, assert_same, make_requests

# 10 does not divide the 64-token bucket: seven chunks, the last one padded. Prompts of 1-23
# tokens end in the first three chunks; resumed requests (prompt + generated) in later ones.
CHUNK = 10


@pytest.fixture(scope="module")
def chunked_engine(tiny_cfg, tiny_variables):
    config = EngineConfig(num_slots=4, max_len=MAX_LEN, decode_chunk=4, record_expert_ids=True,
                          min_prefill_len=MAX_LEN, prefill_chunk=CHUNK)
    return Engine.from_model(tiny_cfg, tiny_variables, config, InferencePrecision("float32"))


def test_chunked_prefill_equals_full_recompute_through_cuts(chunked_engine, tiny_cfg,
                                                             tiny_variables):
    requests = make_requests(4)
    want = reference.generate(reference.model_forward(Transformer(tiny_cfg),
                                                      record_expert_ids=True),
                              tiny_variables, requests, max_len=MAX_LEN)
    engine = chunked_engine
    engine.add(requests)
    finished, longest = [], 0
    while True:  # cut every 9 tokens: each resume re-prefills prompt + generated tokens
        finished += engine.step(token_budget=9).finished
        partial = engine.drain()
        if not partial:
            break
        longest = max(longest, *(len(r.prompt_tokens) + r.num_generated for r in partial))
        engine.add(partial)
    assert longest > 2 * CHUNK  # some prefill really ran a third chunk
    got = {r.request_id: r for r in finished}
    for w in want:
        assert_same(got[w.request_id], w)


def _lower_prefill(cfg, variables, prefill_chunk, N=4, T=256):
    """The prefill program at bucket (N, T), lowered (not run)."""
    config = EngineConfig(num_slots=N, max_len=T, prefill_chunk=prefill_chunk)
    m = engine_lib.model_functions(cfg, config, InferencePrecision("float32"))
    fns = engine_lib.step_fns(m.forward, m.init_cache, config)
    state = jax.eval_shape(fns.empty_state)
    row = jax.ShapeDtypeStruct((N,), jnp.int32)
    return jax.jit(fns.prefill).lower(variables, state, jax.ShapeDtypeStruct((N, T), jnp.int32),
                                      row, row, row, state.rows)


def test_chunks_bound_the_prefill_temporaries(tiny_cfg, tiny_variables):
    temp = lambda chunk: _lower_prefill(tiny_cfg, tiny_variables, chunk).compile(
    ).memory_analysis().temp_size_in_bytes
    whole, chunked = temp(0), temp(16)
    # [4, 256] tokens' logits alone are 2 MiB in float32; a 16-token chunk's are 128 KiB.
    assert chunked < whole / 4, (chunked, whole)


def test_a_chunk_of_the_whole_bucket_is_todays_program(tiny_cfg, tiny_variables):
    text = lambda chunk: _lower_prefill(tiny_cfg, tiny_variables, chunk).as_text()
    assert text(256) == text(0)  # chunk ≥ bucket: the one whole-prompt forward, unchanged
    loops = lambda chunk: text(chunk).count("stablehlo.while")
    assert loops(128) == loops(0) + 1  # the chunk loop


@pytest.mark.parametrize("value", [-1, 65, 1.5, True])
def test_bad_prefill_chunk_is_a_config_error(value):
    with pytest.raises(ConfigError, match=f"prefill_chunk={value!r} is invalid"):
        EngineConfig(max_len=64, prefill_chunk=value)
