"""KV-cache decode equals the full forward (fp32, <= 1e-5) for ragged prompts over several
decode steps, for each dispatch path; padding positions write nothing."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax.model import Transformer, init_cache, presets
from tests.model.conftest import random_variables

PROMPT_LENS = np.array([5, 8, 3])
DECODE_STEPS = 4
MAX_LEN = 16


@pytest.fixture(scope="module")
def setup():
    cfg = presets.get("tiny", n_group=1, topk_group=1)
    tokens = jax.random.randint(jax.random.key(0), (3, 12), 0, cfg.vocab_size)
    # A non-zero expert bias so selection differs from the plain top-k of the scores.
    variables = random_variables(cfg, bias_scale=0.1)
    return cfg, tokens, variables


def _decode_logits(model, variables, tokens, cfg):
    """Prefill each row's prompt (padded with position -1), then teacher-force DECODE_STEPS
    tokens one at a time. Returns logits/expert ids at every compared position."""
    B = tokens.shape[0]
    apply = jax.jit(lambda v, t, p, c: model.apply(v, t, positions_BT=p, cache=c,
                                                   return_expert_ids=True))
    maxp = int(PROMPT_LENS.max())
    pos = np.where(np.arange(maxp)[None] < PROMPT_LENS[:, None], np.arange(maxp)[None], -1)
    cache = init_cache(cfg, B, MAX_LEN, jnp.float32)
    logits, aux, cache = apply(variables, tokens[:, :maxp], jnp.asarray(pos, jnp.int32), cache)
    rows = np.arange(B)
    out = [(PROMPT_LENS - 1, np.asarray(logits)[rows, PROMPT_LENS - 1],
            np.asarray(aux["expert_ids"])[:, rows, PROMPT_LENS - 1])]
    for step in range(DECODE_STEPS):
        p = PROMPT_LENS + step
        tok = jnp.asarray(np.asarray(tokens)[rows, p][:, None])
        logits, aux, cache = apply(variables, tok, jnp.asarray(p[:, None], jnp.int32), cache)
        out.append((p, np.asarray(logits)[:, 0], np.asarray(aux["expert_ids"])[:, :, 0]))
    return out


# The reference path is checked against these two in test_moe.py.
@pytest.mark.parametrize("impl", ["capacity", "ragged"])
def test_decode_matches_full_forward(setup, impl):
    cfg, tokens, variables = setup
    cfg = dataclasses.replace(cfg, moe_impl=impl, capacity_factor=8.0)
    model = Transformer(cfg)
    full, full_aux = jax.jit(lambda v, t: model.apply(v, t, return_expert_ids=True))(
        variables, tokens)
    assert float(full_aux["moe/dropped_frac"]) == 0.0
    full, full_ids = np.asarray(full), np.asarray(full_aux["expert_ids"])
    rows = np.arange(tokens.shape[0])
    for positions, logits, ids in _decode_logits(model, variables, tokens, cfg):
        np.testing.assert_allclose(logits, full[rows, positions], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(ids, full_ids[:, rows, positions])


def test_padding_positions_write_nothing_and_reprefill(setup):
    cfg, tokens, variables = setup
    model = Transformer(cfg)
    apply = jax.jit(lambda t, p, c: model.apply(variables, t, positions_BT=p, cache=c))
    cache = init_cache(cfg, 3, MAX_LEN, jnp.float32)
    pos = jnp.asarray([[0, 1, -1, -1]] * 3, jnp.int32)
    _, _, cache = apply(tokens[:, :4], pos, cache)
    k_BNSQ = np.asarray(cache[0]["k"])
    assert k_BNSQ.shape == (3, cfg.num_kv_heads, MAX_LEN, cfg.head_dim)
    assert np.abs(k_BNSQ[:, :, :2]).sum() > 0 and np.abs(k_BNSQ[:, :, 2:]).sum() == 0
    # Re-prefilling a slot from position 0 with other tokens overwrites it; stale entries
    # beyond the new length are never attended: logits equal a fresh cache's.
    other = tokens[:, 4:7]
    pos3 = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (3, 3))
    fresh = apply(other, pos3, init_cache(cfg, 3, MAX_LEN, jnp.float32))[0]
    pos8 = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (3, 8))
    _, _, cache = apply(tokens[:, :8], pos8, init_cache(cfg, 3, MAX_LEN, jnp.float32))
    reused = apply(other, pos3, cache)[0]
    np.testing.assert_allclose(np.asarray(reused), np.asarray(fresh), atol=1e-6)


def test_decode_step_copies_no_whole_cache(setup):
    """The cache is stored in the layout the attention dots read ([B, N, S, Q]): a decode
    step's compiled program scatters into it and reads it, but never copies or transposes a
    whole cache array. A cache stored [B, S, N, Q] showed two `transpose_copy_fusion`s of the
    full cache per layer here (issue 16: 20-31% of the engine's decode op time)."""
    cfg, tokens, variables = setup
    model = Transformer(cfg)
    B = 3
    cache = init_cache(cfg, B, MAX_LEN, jnp.float32)
    # Donated, as the engine's decode donates its slot state: else the write copies the input.
    apply = jax.jit(lambda t, p, c: model.apply(variables, t, positions_BT=p, cache=c),
                    donate_argnums=2)
    hlo = apply.lower(tokens[:, :1], jnp.full((B, 1), 5, jnp.int32), cache).compile().as_text()
    cache_dims = sorted(cache[0]["k"].shape)  # any permutation of the cache's shape
    whole_cache_copies = []
    for computation in hlo.split("\n\n"):
        if computation.lstrip().startswith(("%fused", "%wrapped")):
            continue  # fusion bodies: their ops run inside the fusion's one kernel
        for line in computation.splitlines():
            if " = " not in line:
                continue
            name, rest = line.strip().removeprefix("ROOT ").split(" = ", 1)
            dims = rest[rest.find("[") + 1:rest.find("]")].split(",")
            is_cache = sorted(int(d) for d in dims if d.isdigit()) == cache_dims
            if is_cache and ("transpose" in name or "copy" in name):
                whole_cache_copies.append(line.strip()[:120])
    assert not whole_cache_copies, whole_cache_copies
