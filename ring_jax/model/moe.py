"""The MoE block (PAPER §4) and its three expert-dispatch implementations.

  * ``reference``: loop over experts, every expert applied to every token and weighted by its
    combine weight (zero when not chosen). Slow, obviously right; the tests' yardstick.
  * ``capacity``: tokens are placed into per-expert buffers of C slots ([E, C, D], token order
    decides who gets a slot; overflow is dropped and counted), experts run as one batched
    einsum. With an `expert` mesh axis the buffers travel with `all_to_all` inside
    `jax.shard_map` (GShard). Fast on CPU, where dense matmuls reach peak.
  * ``dropless_capacity``: the capacity dispatch with C chosen per call from the batch's own
    per-expert counts: a `jax.lax.switch` over a few static capacities (2×, 4×, … the balanced
    share X·K/E, ending at C = X) takes the smallest one the busiest expert fits in, so nothing
    is ever dropped and no token's output depends on its batch neighbours, while a typical
    batch computes ~2× the routed (token, expert) pairs instead of E/K× (the engine's decode).
  * ``ragged``: dropless; assignments sorted by expert and run with `jax.lax.ragged_dot`.
    Across the expert axis tokens are all-gathered, each device runs its local experts on the
    assignments that belong to them, and a reduce-scatter returns the sums (`ragged_all_to_all`
    is unimplemented on CPU, so the dropless path does not use it). ``model.moe_token_chunk``
    runs it over that many local tokens at a time, so the gathered and K-times repeated
    buffers exist for one chunk at a time (what bounds the RL step's memory at pod scale).
    The sort into expert order and the un-sort back are row gathers both ways
    (`sorted_assignment_rows`, `permute_rows`): no [A, D] scatter in the forward or the backward.

All three compute y = Σ_k w_k · Expert_{id_k}(x) for the routed experts; the shared experts are
added by `MoEBlock`.
"""
from __future__ import annotations

import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ring_jax import sharding as sharding_lib
from ring_jax.model import router as router_lib
from ring_jax.model.config import ModelConfig
from ring_jax.model.layers import MLP, constrain, make_param, normal_init

EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"


def _swiglu(x, w_gate, w_up, w_down):
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def experts_reference(x_XD, ids_XK, weights_XK, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Loop over experts: every expert on every token, weighted by its combine weight."""
    y_XD = jnp.zeros(x_XD.shape, jnp.float32)
    for e in range(w_gate_EDF.shape[0]):
        coef_X = jnp.sum(jnp.where(ids_XK == e, weights_XK, 0.0), axis=-1)
        out_XD = _swiglu(x_XD, w_gate_EDF[e], w_up_EDF[e], w_down_EFD[e])
        y_XD = y_XD + coef_X[:, None] * out_XD.astype(jnp.float32)
    return y_XD.astype(x_XD.dtype)


def expert_capacity(num_tokens: int, cfg: ModelConfig) -> int:
    """Slots per expert: capacity_factor × the balanced share X·K/E, at least `min_capacity`,
    at most X (a token picks an expert once, so C = X can never drop)."""
    balanced = num_tokens * cfg.num_experts_per_tok / cfg.num_experts
    wanted = max(cfg.min_capacity, math.ceil(cfg.capacity_factor * balanced))
    return max(1, min(num_tokens, wanted))


def dropless_capacities(num_tokens: int, cfg: ModelConfig) -> tuple[int, ...]:
    """The static capacities `dropless_capacity` chooses from: 2^i × the balanced share
    X·K/E for i = 1, 2, …, ascending, the last one C = X (a token picks an expert at most
    once, so X slots always fit)."""
    balanced = num_tokens * cfg.num_experts_per_tok / cfg.num_experts
    capacities = []
    scale = 2
    while not capacities or capacities[-1] < num_tokens:
        capacities.append(max(1, min(num_tokens, math.ceil(scale * balanced))))
        scale *= 2
    return tuple(sorted(set(capacities)))


def is_dropless(cfg: ModelConfig) -> bool:
    """Whether this dispatch can never drop a token: ``reference``, ``ragged`` and
    ``dropless_capacity`` always, ``capacity`` when capacity_factor ≥ E/K (then
    `expert_capacity` gives C = X slots, and a token picks an expert at most once, so every
    assignment fits)."""
    if not cfg.is_moe or cfg.moe_impl != "capacity":
        return True
    return cfg.capacity_factor >= cfg.num_experts / cfg.num_experts_per_tok


def _slot_positions(ids_A, valid_A, num_experts, capacity):
    """Queue position of each assignment inside its expert (token order), and whether it fits."""
    onehot_AE = jax.nn.one_hot(ids_A, num_experts, dtype=jnp.int32) * valid_A[:, None]
    pos_A = jnp.take_along_axis(jnp.cumsum(onehot_AE, axis=0), ids_A[:, None], axis=1)[:, 0] - 1
    kept_A = valid_A & (pos_A < capacity)
    return pos_A, kept_A


def _capacity_local(x_XD, ids_XK, weights_XK, valid_X, w_gate, w_up, w_down, cfg,
                    expert_axis, tensor_axis, capacity=None):
    """Capacity dispatch of this device's tokens. With `expert_axis`, the [E, C, D] buffers are
    exchanged so each device runs only its E/P local experts (weights [E/P, D, F]). C is
    ``capacity``, or `expert_capacity` of the config when None."""
    X, D = x_XD.shape
    K, E = ids_XK.shape[1], cfg.num_experts
    C = expert_capacity(X, cfg) if capacity is None else capacity
    ids_A = ids_XK.reshape(-1)
    valid_A = jnp.repeat(valid_X, K)
    pos_A, kept_A = _slot_positions(ids_A, valid_A, E, C)
    slot_A = jnp.where(kept_A, pos_A, C)  # out of range: dropped by mode="drop"
    x_AD = jnp.repeat(x_XD, K, axis=0)
    buf_ECD = jnp.zeros((E, C, D), x_XD.dtype).at[ids_A, slot_A].set(x_AD, mode="drop")
    if expert_axis is not None:
        num_shards = jax.lax.axis_size(expert_axis)
        buf_PECD = buf_ECD.reshape(num_shards, E // num_shards, C, D)
        # Send block p (experts of shard p) to shard p; receive one block per source shard.
        recv_PECD = jax.lax.all_to_all(buf_PECD, expert_axis, 0, 0, tiled=False)
        h_PECF = (jax.nn.silu(jnp.einsum("pecd,edf->pecf", recv_PECD, w_gate))
                  * jnp.einsum("pecd,edf->pecf", recv_PECD, w_up))
        out_PECD = jnp.einsum("pecf,efd->pecd", h_PECF, w_down)
        if tensor_axis is not None:
            out_PECD = jax.lax.psum(out_PECD, tensor_axis)
        out_ECD = jax.lax.all_to_all(out_PECD, expert_axis, 0, 0, tiled=False).reshape(E, C, D)
    else:
        h_ECF = (jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf_ECD, w_gate))
                 * jnp.einsum("ecd,edf->ecf", buf_ECD, w_up))
        out_ECD = jnp.einsum("ecf,efd->ecd", h_ECF, w_down)
        if tensor_axis is not None:
            out_ECD = jax.lax.psum(out_ECD, tensor_axis)
    y_AD = out_ECD[ids_A, jnp.minimum(pos_A, C - 1)]
    coef_A = jnp.where(kept_A, weights_XK.reshape(-1), 0.0).astype(y_AD.dtype)
    y_XD = (y_AD * coef_A[:, None]).reshape(X, K, D).sum(1)
    dropped = jnp.sum(valid_A & ~kept_A).astype(jnp.float32)
    return y_XD, dropped


def capacity_branch(ids_XK, valid_X, capacities: tuple[int, ...], num_experts: int):
    """Index of the smallest of ``capacities`` that holds the busiest expert's valid
    assignments (over every shard, inside `shard_map`)."""
    valid_A = jnp.repeat(valid_X, ids_XK.shape[1]).astype(jnp.int32)
    count_E = jnp.zeros((num_experts,), jnp.int32).at[ids_XK.reshape(-1)].add(valid_A)
    busiest = jnp.max(count_E)
    shard_axes = tuple(sorted(_varying_axes(busiest)))
    if shard_axes:
        busiest = jax.lax.pmax(busiest, shard_axes)
    return jnp.searchsorted(jnp.asarray(capacities, jnp.int32), busiest)  # first C ≥ count


def _dropless_capacity_local(x_XD, ids_XK, weights_XK, valid_X, w_gate, w_up, w_down, cfg,
                             expert_axis, tensor_axis):
    """Capacity dispatch with the smallest of `dropless_capacities` that the busiest expert's
    count fits in (`jax.lax.switch`: only that branch runs), so nothing is dropped. Under
    `shard_map` the count is the maximum over every shard: all shards take the same branch,
    so the `all_to_all` buffers agree in shape and the collectives inside match."""
    capacities = dropless_capacities(x_XD.shape[0], cfg)
    branch = capacity_branch(ids_XK, valid_X, capacities, cfg.num_experts)
    branches = [partial(_capacity_local, cfg=cfg, expert_axis=expert_axis,
                        tensor_axis=tensor_axis, capacity=C) for C in capacities]
    return jax.lax.switch(branch, branches, x_XD, ids_XK, weights_XK, valid_X, w_gate, w_up,
                          w_down)


def _ragged_local(x_XD, ids_XK, weights_XK, valid_X, w_gate, w_up, w_down, cfg,
                  expert_axis, tensor_axis):
    """Dropless dispatch with `ragged_dot` over the local experts, all of this device's tokens
    at once, or ``cfg.moe_token_chunk`` of them at a time (`_ragged_chunked`)."""
    if 0 < cfg.moe_token_chunk < x_XD.shape[0]:
        y_XD = _ragged_chunked(x_XD, ids_XK, weights_XK, valid_X, w_gate, w_up, w_down,
                               cfg.moe_token_chunk, expert_axis, tensor_axis)
    else:
        y_XD = _ragged_dispatch(x_XD, ids_XK, weights_XK, valid_X, w_gate, w_up, w_down,
                                expert_axis, tensor_axis)
    return y_XD, jnp.zeros((), jnp.float32)


def _ragged_chunked(x_XD, ids_XK, weights_XK, valid_X, w_gate, w_up, w_down, chunk,
                    expert_axis, tensor_axis):
    """`_ragged_dispatch` over ``chunk`` local tokens at a time (`lax.map`), each chunk
    rematerialised in the backward pass (`jax.checkpoint`): the all-gathered, K-times repeated
    buffers ([P·chunk·K, D] and [P·chunk·K, F], P the expert shards) exist for one chunk at a
    time instead of for all X local tokens. Every token's output is the same sum of its K
    experts' outputs as unchunked (dropless either way); the price is one more forward of the
    dispatch in the backward. The last chunk is padded with invalid tokens (no expert runs on
    them). Under `shard_map` every shard holds the same X, so all shards run the same chunk
    count and the collectives inside each chunk match."""
    X, D = x_XD.shape
    num_chunks = -(-X // chunk)
    pad = num_chunks * chunk - X

    def split(a):  # [X, ...] -> [num_chunks, chunk, ...], padded rows at the end
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(num_chunks, chunk, *a.shape[1:])

    dispatch = jax.checkpoint(partial(_ragged_dispatch, expert_axis=expert_axis,
                                      tensor_axis=tensor_axis))
    y_NCD = jax.lax.map(lambda xs: dispatch(*xs, w_gate, w_up, w_down),
                        tuple(map(split, (x_XD, ids_XK, weights_XK, valid_X))))
    return y_NCD.reshape(num_chunks * chunk, D)[:X]


def inverse_permutation(perm_A):
    """``inv`` with ``inv[perm[i]] = i``: one int32 scatter of [A] (unique indices)."""
    A = perm_A.shape[0]
    return jnp.zeros((A,), jnp.int32).at[perm_A].set(
        jnp.arange(A, dtype=jnp.int32), unique_indices=True, mode="promise_in_bounds")


@jax.custom_vjp
def permute_rows(x_AD, perm_A, inverse_A):
    """``x_AD[perm_A]`` for a permutation ``perm_A`` whose inverse is ``inverse_A``, as a gather
    in the forward AND the backward (the cotangent is ``ct_AD[inverse_A]``).

    Why not plain indexing or ``.at[perm].set``: the transpose of a gather is a scatter-add, and
    JAX differentiates an overwriting scatter with non-unique indices by scattering a u32 id per
    element and comparing them (u32 and pred [A, D] buffers: 1 GiB each per MoE layer for
    Ling-1T at chunk 256). A permutation needs neither: each direction is one row gather
    (the RL step's bytes accessed about halve, BUILD.md "Will it fit?")."""
    return _take_rows(x_AD, perm_A)


def _take_rows(x_ND, rows_A):
    return x_ND.at[rows_A].get(mode="promise_in_bounds")


def _permute_rows_fwd(x_AD, perm_A, inverse_A):
    return _take_rows(x_AD, perm_A), (inverse_A,)


def _permute_rows_bwd(res, ct_AD):
    (inverse_A,) = res
    return _take_rows(ct_AD, inverse_A), None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def sorted_assignment_rows(x_XD, order_A, inverse_A, K):
    """The input row of each (token, k) assignment in sorted order: ``repeat(x_XD, K)[order_A]``
    as one gather of token rows (no repeated [X·K, D] copy), with ``inverse_A`` the inverse of
    the permutation ``order_A``. Its cotangent is a gather too: token t's gradient is the sum
    of its K assignments' rows, ``ct_AD[inverse_A].reshape(X, K, D).sum(1)`` (plain indexing
    would transpose to a scatter-add of [A, D] rows)."""
    return _take_rows(x_XD, order_A // K)


def _sorted_assignment_rows_fwd(x_XD, order_A, inverse_A, K):
    return _take_rows(x_XD, order_A // K), (inverse_A,)


def _sorted_assignment_rows_bwd(K, res, ct_AD):
    (inverse_A,) = res
    ct_XD = _take_rows(ct_AD, inverse_A).reshape(-1, K, ct_AD.shape[1]).sum(1)
    return ct_XD, None, None


sorted_assignment_rows.defvjp(_sorted_assignment_rows_fwd, _sorted_assignment_rows_bwd)


def _ragged_dispatch(x_XD, ids_XK, weights_XK, valid_X, w_gate, w_up, w_down,
                     expert_axis, tensor_axis):
    """Every (token, expert) assignment sorted by local expert and run with `ragged_dot`. With
    `expert_axis`, tokens are all-gathered, each shard computes its experts' share, and a
    reduce-scatter sums them."""
    D, K = x_XD.shape[1], ids_XK.shape[1]
    E_local = w_gate.shape[0]
    if expert_axis is not None:
        gather = partial(jax.lax.all_gather, axis_name=expert_axis, axis=0, tiled=True)
        x_XD, ids_XK, weights_XK, valid_X = map(gather, (x_XD, ids_XK, weights_XK, valid_X))
        first_expert = jax.lax.axis_index(expert_axis) * E_local
    else:
        first_expert = 0
    local_A = ids_XK.reshape(-1) - first_expert
    mine_A = jnp.repeat(valid_X, K) & (local_A >= 0) & (local_A < E_local)
    group_A = jnp.where(mine_A, local_A, E_local)  # others sort last, outside every group
    order_A = jnp.argsort(group_A, stable=True)
    inverse_A = inverse_permutation(order_A)
    group_sizes = jnp.bincount(group_A, length=E_local + 1)[:E_local].astype(jnp.int32)
    x_AD = sorted_assignment_rows(x_XD, order_A, inverse_A, K)
    h_AF = (jax.nn.silu(jax.lax.ragged_dot(x_AD, w_gate, group_sizes))
            * jax.lax.ragged_dot(x_AD, w_up, group_sizes))
    out_AD = jax.lax.ragged_dot(h_AF, w_down, group_sizes)
    y_AD = permute_rows(out_AD, inverse_A, order_A)  # back to (token, k) order
    coef_A = jnp.where(mine_A, weights_XK.reshape(-1), 0.0).astype(y_AD.dtype)
    y_XD = (y_AD * coef_A[:, None]).reshape(-1, K, D).sum(1)
    if tensor_axis is not None:
        y_XD = jax.lax.psum(y_XD, tensor_axis)
    if expert_axis is not None:
        y_XD = jax.lax.psum_scatter(y_XD, expert_axis, scatter_dimension=0, tiled=True)
    return y_XD


def _varying_axes(x) -> frozenset:
    """Mesh axes along which `x` differs between shards inside shard_map (its type says)."""
    return jax.typeof(x).manual_axis_type.varying


def dispatch_experts(x_BTD, ids_BTK, weights_BTK, valid_BT, w_gate_EDF, w_up_EDF, w_down_EFD,
                     cfg: ModelConfig):
    """Routed-expert output [B, T, D] and the number of dropped (token, expert) assignments.

    Under a mesh (`jax.set_mesh`) the capacity, dropless_capacity and ragged paths run inside
    `jax.shard_map` with specs taken from the logical-axis rules: tokens split over the batch
    axes, experts over `expert`, the expert FFN dim over `tensor`; weights sharded over other
    axes (fsdp) are all-gathered first.
    """
    B, T, D = x_BTD.shape
    if cfg.moe_impl == "reference":
        y_XD = experts_reference(x_BTD.reshape(B * T, D), ids_BTK.reshape(B * T, -1),
                                 weights_BTK.reshape(B * T, -1), w_gate_EDF, w_up_EDF, w_down_EFD)
        return y_XD.reshape(B, T, D), jnp.zeros((), jnp.float32)
    local_fn = {"capacity": _capacity_local, "dropless_capacity": _dropless_capacity_local,
                "ragged": _ragged_local}[cfg.moe_impl]
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        y_XD, dropped = local_fn(x_BTD.reshape(B * T, D), ids_BTK.reshape(B * T, -1),
                                 weights_BTK.reshape(B * T, -1), valid_BT.reshape(-1),
                                 w_gate_EDF, w_up_EDF, w_down_EFD, cfg, None, None)
        return y_XD.reshape(B, T, D), dropped

    rules = sharding_lib.current_rules()
    batch_axes = sharding_lib.batch_mesh_axes(mesh, B, rules)
    w_in_spec = sharding_lib.spec_for(("exp", "embed", "expert_mlp"), mesh, rules)
    w_out_spec = sharding_lib.spec_for(("exp", "expert_mlp", "embed"), mesh, rules)
    expert_axis = EXPERT_AXIS if w_in_spec[0] == EXPERT_AXIS else None
    tensor_axis = TENSOR_AXIS if w_in_spec[2] == TENSOR_AXIS else None
    tok = P(batch_axes or None)

    def body(x, ids, w, valid, wg, wu, wd):
        # FSDP: gather the embed dim of the expert weights (its grad becomes a reduce-scatter).
        if w_in_spec[1] is not None:
            wg = jax.lax.all_gather(wg, w_in_spec[1], axis=1, tiled=True)
            wu = jax.lax.all_gather(wu, w_in_spec[1], axis=1, tiled=True)
        if w_out_spec[2] is not None:
            wd = jax.lax.all_gather(wd, w_out_spec[2], axis=2, tiled=True)
        b, t, d = x.shape
        y, dropped = local_fn(x.reshape(b * t, d), ids.reshape(b * t, -1), w.reshape(b * t, -1),
                              valid.reshape(-1), wg, wu, wd, cfg, expert_axis, tensor_axis)
        # Sum the local counts over the shards that hold different tokens.
        varying = tuple(a for a in mesh.axis_names if a in _varying_axes(dropped))
        dropped = jax.lax.psum(dropped, varying) if varying else dropped
        # Tokens replicated over an axis (a batch too small to split) came back identical on
        # each of its shards but typed as varying there; pmean makes them one value.
        extra = tuple(a for a in mesh.axis_names
                      if a in _varying_axes(y) and a not in batch_axes)
        y = jax.lax.pmean(y, extra) if extra else y
        return y.reshape(b, t, d), dropped

    fn = jax.shard_map(body, mesh=mesh,
                       in_specs=(tok, tok, tok, tok, w_in_spec, w_in_spec, w_out_spec),
                       out_specs=(tok, P()))
    return fn(x_BTD, ids_BTK, weights_BTK, valid_BT, w_gate_EDF, w_up_EDF, w_down_EFD)


class MoEBlock(nn.Module):
    """Router (fp32) + routed experts + shared expert(s) (PAPER §4).

    Returns the output [B, T, D] and the router statistics of this layer.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, valid_BT, forced_ids_BTK=None):
        cfg = self.cfg
        dt, pdt = cfg.compute_jnp_dtype, cfg.param_jnp_dtype
        D, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        B, T, _ = x_BTD.shape
        init = normal_init(cfg)
        w_router_DE = make_param(self, "router", (D, E), ("embed", "router_exp"), pdt, init)
        # Expert bias: selection only, updated by `update_expert_bias`, never by gradients.
        bias_E = self.variable("router", "expert_bias", lambda: nn.with_logical_partitioning(
            jnp.zeros, ("router_exp",))((E,), jnp.float32)).value
        bias_E = bias_E.unbox() if isinstance(bias_E, nn.LogicallyPartitioned) else bias_E
        w_gate_EDF = make_param(self, "gate", (E, D, F), ("exp", "embed", "expert_mlp"), pdt, init)
        w_up_EDF = make_param(self, "up", (E, D, F), ("exp", "embed", "expert_mlp"), pdt, init)
        w_down_EFD = make_param(self, "down", (E, F, D), ("exp", "expert_mlp", "embed"), pdt, init)

        # Router in float32 (PAPER §4): near-ties between the k-th and (k+1)-th scores flip
        # experts, so the scores get full precision whatever the compute dtype.
        logits_BTE = jnp.einsum("btd,de->bte", x_BTD.astype(jnp.float32),
                                w_router_DE.astype(jnp.float32),
                                precision=jax.lax.Precision.HIGHEST)
        forced_XK = None if forced_ids_BTK is None else forced_ids_BTK.reshape(B * T, -1)
        routing = router_lib.route(logits_BTE.reshape(B * T, E), bias_E, cfg, forced_XK)
        ids_BTK = routing.ids_XK.reshape(B, T, -1)
        weights_BTK = routing.weights_XK.reshape(B, T, -1)

        y_BTD, dropped = dispatch_experts(
            x_BTD.astype(dt), ids_BTK, weights_BTK.astype(dt), valid_BT,
            w_gate_EDF.astype(dt), w_up_EDF.astype(dt), w_down_EFD.astype(dt), cfg)
        y_BTD = constrain(y_BTD, ("act_batch", "act_len", "act_embed"))
        if cfg.num_shared_experts > 0:
            shared = MLP(cfg, F * cfg.num_shared_experts, name="shared")
            y_BTD = y_BTD + shared(x_BTD)

        valid_X = valid_BT.reshape(-1)
        stats = {
            "load": router_lib.expert_load(routing.ids_XK, valid_X, E),
            "z_loss": router_lib.z_loss(logits_BTE.reshape(B * T, E), valid_X),
            "seq_aux_loss": router_lib.sequence_balance_loss(
                routing.scores_XE.reshape(B, T, E), ids_BTK, valid_BT, cfg.num_experts_per_tok),
            "dropped": dropped,
            "assignments": jnp.sum(valid_X).astype(jnp.float32) * ids_BTK.shape[-1],
            "expert_ids": ids_BTK,
        }
        return y_BTD.astype(dt), stats
