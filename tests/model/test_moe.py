"""Fast MoE dispatch paths equal the loop-over-experts reference (outputs and grads) when nothing
is dropped; capacity overflow is dropped and reported."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ring_jax.model import moe, presets
from ring_jax.model import router as router_lib

B, T = 2, 24


@pytest.fixture(scope="module")
def inputs():
    cfg = presets.get("tiny")
    E, D, F = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    ks = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(ks[0], (B, T, D))
    logits = jax.random.normal(ks[1], (B * T, E)) * 2
    routing = router_lib.route(logits, jnp.zeros(E), cfg)
    ids = routing.ids_XK.reshape(B, T, -1)
    w = routing.weights_XK.reshape(B, T, -1)
    weights = [jax.random.normal(k, s) * 0.1 for k, s in
               zip(ks[2:5], [(E, D, F), (E, D, F), (E, F, D)])]
    valid = jnp.ones((B, T), bool).at[1, -3:].set(False)
    return cfg, x, ids, w, valid, weights


@functools.cache
def _grad_fn(cfg):
    """Jitted (loss, (y, dropped)), grads w.r.t. x, w and the expert weights; one compile per
    config, whatever the routing."""
    def loss(x, w, wg, wu, wd, ids, valid):
        y, dropped = moe.dispatch_experts(x, ids, w, valid, wg, wu, wd, cfg)
        # Padding rows are excluded from the loss (their output is irrelevant).
        return jnp.sum((y * valid[..., None]) ** 2 * jnp.arange(y.shape[-1])), (y, dropped)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


def _run(cfg, x, ids, w, valid, weights):
    (_, (y, dropped)), grads = _grad_fn(cfg)(x, w, *weights, ids, valid)
    return y * valid[..., None], dropped, grads


def _assert_dropless_and_equal_to_reference(fast_cfg, cfg, x, ids, w, valid, weights):
    """``fast_cfg``'s dispatch drops nothing; its output and grads equal the loop reference's."""
    y, dropped, grads = _run(fast_cfg, x, ids, w, valid, weights)
    y_ref, _, grads_ref = _run(dataclasses.replace(cfg, moe_impl="reference"), x, ids, w, valid,
                               weights)
    assert float(dropped) == 0.0
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def reference(inputs):
    cfg, *rest = inputs
    return _run(dataclasses.replace(cfg, moe_impl="reference"), *rest)


@pytest.mark.parametrize("impl", ["capacity", "dropless_capacity", "ragged"])
def test_fast_paths_match_reference(inputs, reference, impl):
    cfg, *rest = inputs
    # capacity_factor 8 with X=48, K=2, E=8 gives C = X: nothing can drop.
    y, dropped, grads = _run(dataclasses.replace(cfg, moe_impl=impl, capacity_factor=8.0), *rest)
    y_ref, _, grads_ref = reference
    assert float(dropped) == 0.0
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-4, rtol=1e-4)


def test_capacity_overflow_is_dropped_and_counted(inputs):
    cfg, x, ids, w, valid, weights = inputs
    # Every token picks experts 0 and 1: with C slots each, X - C assignments per expert drop.
    ids = jnp.broadcast_to(jnp.asarray([0, 1], jnp.int32), ids.shape)
    cfg = dataclasses.replace(cfg, moe_impl="capacity", capacity_factor=1.0, min_capacity=4)
    num_valid = int(valid.sum())
    C = moe.expert_capacity(B * T, cfg)
    assert C == 12  # ceil(1.0 * 48 * 2 / 8)
    y, dropped = jax.jit(lambda *a: moe.dispatch_experts(*a, cfg))(x, ids, w, valid, *weights)
    assert float(dropped) == 2 * (num_valid - C)
    # The first C valid tokens (token order) are processed, later ones get zero output.
    y_ref = moe.experts_reference(x.reshape(B * T, -1), ids.reshape(B * T, -1),
                                  w.reshape(B * T, -1), *weights).reshape(B, T, -1)
    np.testing.assert_allclose(np.asarray(y[0, :C]), np.asarray(y_ref[0, :C]), atol=1e-5)
    assert np.abs(np.asarray(y[0, C:])).max() == 0.0


def test_capacity_is_dropless_for_small_batches():
    cfg = presets.get("tiny", capacity_factor=1.0)
    assert moe.expert_capacity(8, cfg) == 8  # decode batches get one slot per token


_slot_positions = jax.jit(moe._slot_positions, static_argnums=2)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_slot_positions_property(num_assignments, capacity, seed):
    """Per expert, the first `capacity` valid assignments in token order get slots 0..C-1;
    the dropped count is Σ_e max(0, n_e − C)."""
    rng = np.random.default_rng(seed)
    E = 4
    ids = rng.integers(0, E, 40)
    valid = (rng.random(40) < 0.8) & (np.arange(40) < num_assignments)  # one compiled shape
    pos, kept = _slot_positions(jnp.asarray(ids), jnp.asarray(valid), E, capacity)
    pos, kept = np.asarray(pos), np.asarray(kept)
    for e in range(E):
        mine = np.flatnonzero((ids == e) & valid)
        np.testing.assert_array_equal(pos[mine], np.arange(len(mine)))
        np.testing.assert_array_equal(kept[mine], np.arange(len(mine)) < capacity)
    assert not kept[~valid].any()
    counts = np.bincount(ids[valid], minlength=E)
    assert int((valid & ~kept).sum()) == int(np.maximum(counts - capacity, 0).sum())


def test_capacity_factor_e_over_k_is_dropless_even_when_every_token_picks_the_same_experts(
        inputs, reference):
    cfg, x, ids, w, valid, weights = inputs
    dropless = dataclasses.replace(cfg, moe_impl="capacity",
                                   capacity_factor=cfg.num_experts / cfg.num_experts_per_tok)
    assert moe.is_dropless(dropless)
    assert not moe.is_dropless(dataclasses.replace(dropless, capacity_factor=2.0))
    assert moe.is_dropless(dataclasses.replace(cfg, moe_impl="ragged", capacity_factor=1.0))
    # Worst case: every token routed to experts 0 and 1 (C = X·K/E·E/K = X slots each).
    same_ids = jnp.broadcast_to(jnp.arange(cfg.num_experts_per_tok), ids.shape)
    y, dropped, _ = _run(dropless, x, same_ids, w, valid, weights)
    y_ref, _, _ = _run(dataclasses.replace(cfg, moe_impl="reference"), x, same_ids, w, valid,
                       weights)
    assert float(dropped) == 0.0
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5, rtol=1e-5)
    # Below E/K the same routing drops: what the check in `derive` guards against.
    _, dropped_cf2, _ = _run(dataclasses.replace(dropless, capacity_factor=2.0), x, same_ids, w,
                             valid, weights)
    assert float(dropped_cf2) > 0


def test_dropless_capacities_end_at_all_tokens():
    cfg = presets.get("small")  # E=32, K=4: balanced share X/8
    assert moe.dropless_capacities(64, cfg) == (16, 32, 64)
    assert moe.dropless_capacities(16, cfg) == (4, 8, 16)
    assert moe.dropless_capacities(3, cfg) == (1, 2, 3)
    assert moe.dropless_capacities(1, cfg) == (1,)
    assert moe.is_dropless(dataclasses.replace(cfg, moe_impl="dropless_capacity",
                                               capacity_factor=1.0))


@pytest.mark.parametrize("routing, branch", [("balanced", 0), ("expert_0_overloaded", 1),
                                             ("all_same", 1)])
def test_dropless_capacity_never_drops_and_matches_reference(inputs, routing, branch):
    """Whichever capacity branch the busiest expert selects (tiny: X=48, K=2, E=8 gives
    C ∈ {24, 48}; the smallest for balanced routing, C = X when an expert has more than 24),
    the output and grads equal the reference and nothing is dropped. A capacity-limited
    dispatch would give zero output to the overflowing tokens instead."""
    cfg, x, ids, w, valid, weights = inputs
    X, E, K = B * T, cfg.num_experts, cfg.num_experts_per_tok
    if routing == "balanced":
        ids = (jnp.arange(X * K).reshape(B, T, K) % E).astype(jnp.int32)
    elif routing == "expert_0_overloaded":
        # Expert 0 takes the first 30 tokens (above 2× the balanced share of 12).
        first_BT = jnp.arange(X).reshape(B, T) < 30
        ids = ids.at[..., 0].set(jnp.where(first_BT, 0, ids[..., 0]))
        ids = ids.at[..., 1].set(jnp.where(ids[..., 1] == ids[..., 0], (ids[..., 0] + 1) % E,
                                           ids[..., 1]))
    else:
        ids = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), ids.shape)
    capacities = moe.dropless_capacities(X, cfg)
    assert capacities == (24, 48)
    assert int(moe.capacity_branch(ids.reshape(X, K), valid.reshape(X), capacities, E)) == branch
    dropless = dataclasses.replace(cfg, moe_impl="dropless_capacity", capacity_factor=1.0)
    _assert_dropless_and_equal_to_reference(dropless, cfg, x, ids, w, valid, weights)
    # The same routing through a plain capacity dispatch at the smallest branch's C drops
    # tokens exactly when the routing overflows it: the fallback keeps it dropless.
    limited = dataclasses.replace(cfg, moe_impl="capacity", min_capacity=1,
                                  capacity_factor=capacities[0] * E / (X * K))
    assert moe.expert_capacity(X, limited) == capacities[0]
    _, dropped_limited, _ = _run(limited, x, ids, w, valid, weights)
    assert (float(dropped_limited) > 0) == (branch > 0)


@pytest.mark.parametrize("chunk", [1, 7])
@pytest.mark.parametrize("routing", ["router", "all_same"])
def test_ragged_token_chunks_match_reference(inputs, chunk, routing):
    """`moe_token_chunk` runs the ragged dispatch over chunks of the tokens (X = 48: chunk 7
    pads the last of 7 chunks with invalid tokens, chunk 1 runs 48 chunks), with uneven routing
    too (every token on experts 0 and 1, so one chunk's groups are all-or-nothing). Output and
    grads equal the reference; a chunk that dropped or double-counted its padding, or whose
    remat lost the weight gradient of a chunk, would not."""
    cfg, x, ids, w, valid, weights = inputs
    if routing == "all_same":
        ids = jnp.broadcast_to(jnp.arange(cfg.num_experts_per_tok, dtype=jnp.int32), ids.shape)
    chunked = dataclasses.replace(cfg, moe_impl="ragged", moe_token_chunk=chunk)
    _assert_dropless_and_equal_to_reference(chunked, cfg, x, ids, w, valid, weights)


def _intermediate_dims(jaxpr) -> set[int]:
    """Every dimension size of every intermediate in ``jaxpr`` (sub-jaxprs included)."""
    dims = set()
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            dims.update(getattr(v.aval, "shape", ()))
        for sub in jax.core.jaxprs_in_params(eqn.params):
            dims |= _intermediate_dims(sub)
    return dims


def test_ragged_token_chunk_bounds_the_assignment_buffers(inputs):
    """What the lever is for: unchunked, the (token, expert) buffers of the forward and the
    backward are [X·K, ·] = [96, ·]; with chunks of 8 tokens they are [8·K, ·] = [16, ·] and
    nothing of length X·K is left."""
    cfg, x, ids, w, valid, weights = inputs
    K = cfg.num_experts_per_tok
    dims = {}
    for chunk in (0, 8):
        run = _grad_fn(dataclasses.replace(cfg, moe_impl="ragged", moe_token_chunk=chunk))
        dims[chunk] = _intermediate_dims(jax.make_jaxpr(run)(x, w, *weights, ids, valid).jaxpr)
    assert B * T * K in dims[0]
    assert B * T * K not in dims[8] and 8 * K in dims[8]


def _scatter_operand_shapes(jaxpr) -> list[tuple[int, ...]]:
    """The operand shape of every scatter-like equation in ``jaxpr`` (sub-jaxprs included)."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith("scatter"):
            shapes.append(eqn.invars[0].aval.shape)
        for sub in jax.core.jaxprs_in_params(eqn.params):
            shapes += _scatter_operand_shapes(sub)
    return shapes


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_permute_rows_equals_indexing_in_value_and_grad(num_rows, seed):
    """`moe.permute_rows` is ``x[perm]`` with the cotangent gathered by the inverse
    permutation; value and gradient equal plain indexing's for any permutation."""
    k_perm, k_x, k_ct = jax.random.split(jax.random.key(seed), 3)
    perm = jax.random.permutation(k_perm, num_rows).astype(jnp.int32)
    inverse = moe.inverse_permutation(perm)
    np.testing.assert_array_equal(np.asarray(inverse), np.argsort(np.asarray(perm)))
    x = jax.random.normal(k_x, (num_rows, 3))
    ct = jax.random.normal(k_ct, (num_rows, 3))
    y, vjp = jax.vjp(lambda a: moe.permute_rows(a, perm, inverse), x)
    y_ref, vjp_ref = jax.vjp(lambda a: a[perm], x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    np.testing.assert_array_equal(np.asarray(vjp(ct)[0]), np.asarray(vjp_ref(ct)[0]))


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_sorted_assignment_rows_equals_repeat_then_index(num_tokens, k, seed):
    """`moe.sorted_assignment_rows` is ``repeat(x, K)[order]`` in value and gradient (each
    token's gradient the sum over its K sorted rows), for any permutation ``order``."""
    k_perm, k_x, k_ct = jax.random.split(jax.random.key(seed), 3)
    order = jax.random.permutation(k_perm, num_tokens * k).astype(jnp.int32)
    inverse = moe.inverse_permutation(order)
    x = jax.random.normal(k_x, (num_tokens, 3))
    ct = jax.random.normal(k_ct, (num_tokens * k, 3))
    y, vjp = jax.vjp(lambda a: moe.sorted_assignment_rows(a, order, inverse, k), x)
    y_ref, vjp_ref = jax.vjp(lambda a: jnp.repeat(a, k, axis=0)[order], x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    np.testing.assert_allclose(np.asarray(vjp(ct)[0]), np.asarray(vjp_ref(ct)[0]), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("chunk", [0, 8])
def test_ragged_dispatch_scatters_no_rows(inputs, chunk):
    """The ragged dispatch's forward and backward (remat per chunk included) sort and un-sort
    the [A, D] assignment rows by gathers only (`moe.permute_rows`): the only scatters left are
    over 1-D integer arrays (the inverse permutation, the group sizes). An ``.at[order].set``
    un-sort, or plain indexing whose transpose is a scatter-add, would show a 2-D operand (on
    TPU the former became u32 and pred [A, D] buffers per MoE layer, BUILD.md "Will it fit?")."""
    cfg, x, ids, w, valid, weights = inputs
    run = _grad_fn(dataclasses.replace(cfg, moe_impl="ragged", moe_token_chunk=chunk))
    shapes = _scatter_operand_shapes(jax.make_jaxpr(run)(x, w, *weights, ids, valid).jaxpr)
    assert shapes and all(len(s) == 1 for s in shapes), shapes
