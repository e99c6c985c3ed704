"""The engine's two jitted programs: prefill-into-slots and a multi-step decode over all slots.

Both operate on `SlotState`, a pytree of fixed-shape arrays with one row per slot (the KV cache
and each slot's position, counters and sampling parameters), so each compiles once per shape
(decode: once; prefill: once per (rows, prompt-length) bucket) and the state is donated and
updated in place.

Positions: slot b holds ``pos_B[b] + 1`` tokens in its cache rows; ``last_token_B[b]`` is the
token at position ``pos_B[b]``, not yet fed to the model. Feeding it yields the logits that
sample generated token number ``num_generated_B[b]``. A sequence (prompt + response) never
exceeds ``max_len`` tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from ring_jax.rollout import sampling

FINISH_NONE, FINISH_STOP, FINISH_LENGTH = 0, 1, 2


@flax.struct.dataclass
class SamplingRows:
    """Per-row sampling parameters and limits (host `SamplingParams` as arrays)."""

    seed_B: jax.Array  # uint32
    temperature_B: jax.Array  # float32
    top_k_B: jax.Array  # int32, 0 = off
    top_p_B: jax.Array  # float32
    greedy_B: jax.Array  # bool
    min_new_B: jax.Array  # int32
    max_new_B: jax.Array  # int32
    stop_BS: jax.Array  # int32 [B, max_stop_tokens], -1 padded


@flax.struct.dataclass
class SlotState:
    cache: Any  # the model's KV cache pytree, batch axis first
    last_token_B: jax.Array  # int32
    pos_B: jax.Array  # int32
    num_generated_B: jax.Array  # int32
    active_B: jax.Array  # bool
    rows: SamplingRows


@dataclasses.dataclass(frozen=True)
class StepFns:
    """Builds the jitted programs for one model + engine configuration.

    ``forward(variables, tokens_BT, positions_BT, cache) -> (logits_BTV, expert_ids_LBTK | None,
    cache)`` is the model's cached forward; ``init_cache(batch)`` an empty cache of max_len.
    """

    forward: Callable[..., tuple[jax.Array, jax.Array | None, Any]]
    init_cache: Callable[[int], Any]
    num_slots: int
    max_len: int
    max_stop_tokens: int
    decode_chunk: int
    prefill_chunk: int = 0  # tokens per row per forward of a prefill; 0: the whole bucket

    def empty_state(self) -> SlotState:
        B = self.num_slots
        rows = SamplingRows(
            seed_B=jnp.zeros((B,), jnp.uint32), temperature_B=jnp.ones((B,), jnp.float32),
            top_k_B=jnp.zeros((B,), jnp.int32), top_p_B=jnp.ones((B,), jnp.float32),
            greedy_B=jnp.zeros((B,), bool), min_new_B=jnp.zeros((B,), jnp.int32),
            max_new_B=jnp.ones((B,), jnp.int32),
            stop_BS=jnp.full((B, self.max_stop_tokens), -1, jnp.int32))
        return SlotState(cache=self.init_cache(B), last_token_B=jnp.zeros((B,), jnp.int32),
                         pos_B=jnp.full((B,), -1, jnp.int32),
                         num_generated_B=jnp.zeros((B,), jnp.int32),
                         active_B=jnp.zeros((B,), bool), rows=rows)

    def _sample_and_finish(self, logits_BV, rows: SamplingRows, num_generated_B, pos_B,
                           active_B):
        """Samples token number ``num_generated_B`` of each row and decides who finished."""
        key_B = jax.vmap(sampling.token_key)(rows.seed_B, num_generated_B)
        V = logits_BV.shape[-1]
        is_stop_BV = jnp.zeros((logits_BV.shape[0], V), bool)
        is_stop_BV = jax.vmap(lambda m, s: m.at[s].set(True, mode="drop"))(
            is_stop_BV, jnp.where(rows.stop_BS >= 0, rows.stop_BS, V))
        # min_new_tokens: stop tokens cannot be sampled before that many tokens exist.
        banned_BV = is_stop_BV & (num_generated_B < rows.min_new_B)[:, None]
        token_B, logprob_B = sampling.sample(
            logits_BV, key_B, temperature_B=rows.temperature_B, top_k_B=rows.top_k_B,
            top_p_B=rows.top_p_B, greedy_B=rows.greedy_B, banned_BV=banned_BV)
        stopped_B = jnp.any(rows.stop_BS == token_B[:, None], axis=-1)
        stopped_B &= num_generated_B >= rows.min_new_B
        # The sampled token sits at pos + 1; the sequence is full when that is max_len - 1.
        length_B = (num_generated_B + 1 >= rows.max_new_B) | (pos_B + 2 >= self.max_len)
        finish_B = jnp.where(stopped_B, FINISH_STOP, jnp.where(length_B, FINISH_LENGTH,
                                                               FINISH_NONE))
        finish_B = jnp.where(active_B, finish_B, FINISH_NONE)
        return token_B, logprob_B, finish_B

    def prefill(self, variables, state: SlotState, tokens_NT, length_N, slot_N,
                num_generated_N, rows_N: SamplingRows):
        """Prefills N sequences (prompt + tokens generated so far) and inserts them into slots.

        Rows with ``slot_N == num_slots`` are padding (dropped by the scatter). Returns the new
        state and, per row, the first sampled token, its log-prob, expert ids [L, N, K] (or
        None) and finish code.
        """
        last_N = length_N - 1
        logits_NV, expert_ids_LNK, cache_N = self._prefill_forward(variables, tokens_NT,
                                                                   length_N)
        active_N = slot_N < self.num_slots
        token_N, logprob_N, finish_N = self._sample_and_finish(
            logits_NV, rows_N, num_generated_N, last_N, active_N)

        def insert(full, part):
            return full.at[slot_N].set(part.astype(full.dtype), mode="drop")

        state = SlotState(
            cache=jax.tree.map(insert, state.cache, cache_N),
            last_token_B=insert(state.last_token_B, token_N),
            pos_B=insert(state.pos_B, length_N),
            num_generated_B=insert(state.num_generated_B, num_generated_N + 1),
            active_B=insert(state.active_B, finish_N == FINISH_NONE),
            rows=jax.tree.map(insert, state.rows, rows_N))
        return state, (token_N, logprob_N, expert_ids_LNK, finish_N)

    def _forward_chunk(self, variables, tokens_NC, start, length_N, cache_N):
        """The forward of tokens [start, start + C) of each row into the rows' cache; returns
        the logits and expert ids [L, N, K] at each row's last token if it falls in this chunk
        (else at the chunk's nearest end) and the cache."""
        C = tokens_NC.shape[1]
        t_NC = start + jnp.arange(C, dtype=jnp.int32)[None, :]
        positions_NC = jnp.where(t_NC < length_N[:, None], t_NC, -1)  # -1: padding, no write
        logits_NCV, expert_ids_LNCK, cache_N = self.forward(variables, tokens_NC, positions_NC,
                                                            cache_N)
        at_N = jnp.clip(length_N - 1 - start, 0, C - 1)
        logits_NV = jnp.take_along_axis(logits_NCV, at_N[:, None, None], axis=1)[:, 0]
        expert_ids_LNK = None
        if expert_ids_LNCK is not None:
            expert_ids_LNK = jnp.take_along_axis(
                expert_ids_LNCK, at_N[None, :, None, None], axis=2)[:, :, 0]
        return logits_NV, expert_ids_LNK, cache_N

    def _prefill_forward(self, variables, tokens_NT, length_N):
        """Logits and expert ids [L, N, K] at each row's last token, and the N rows' cache.

        With ``prefill_chunk`` = C < T (chunked prefill), the T tokens go through the model C at a
        time in a loop, each chunk writing its keys/values into the rows' cache and attending
        over the chunks before it there (the cached forward's mask: position p sees slots
        ≤ p), so the activations exist for [N, C] tokens at a time instead of [N, T]; the loop
        stops after the chunk holding the longest row's last token. Each query attends over the
        same keys as in one whole-prompt forward: the same computation up to float summation
        order.
        """
        N, T = tokens_NT.shape
        cache_N = self.init_cache(N)
        C = self.prefill_chunk
        if not 0 < C < T:
            return self._forward_chunk(variables, tokens_NT, 0, length_N, cache_N)
        num_chunks = -(-T // C)
        tokens_NT = jnp.pad(tokens_NT, ((0, 0), (0, num_chunks * C - T)))
        last_N = length_N - 1
        chunk_fn = lambda start, cache: self._forward_chunk(
            variables, jax.lax.dynamic_slice_in_dim(tokens_NT, start, C, axis=1), start,
            length_N, cache)
        logits_NV, expert_ids_LNK, _ = jax.eval_shape(chunk_fn, 0, cache_N)

        def body(c, carry):
            logits_NV, expert_ids_LNK, cache_N = carry
            new_logits_NV, new_expert_ids_LNK, cache_N = chunk_fn(c * C, cache_N)
            here_N = last_N // C == c  # the row's last token is in this chunk
            logits_NV = jnp.where(here_N[:, None], new_logits_NV, logits_NV)
            if expert_ids_LNK is not None:
                expert_ids_LNK = jnp.where(here_N[None, :, None], new_expert_ids_LNK,
                                           expert_ids_LNK)
            return logits_NV, expert_ids_LNK, cache_N

        zeros = lambda x: None if x is None else jnp.zeros(x.shape, x.dtype)
        return jax.lax.fori_loop(0, jnp.max(last_N) // C + 1, body,
                                 (zeros(logits_NV), zeros(expert_ids_LNK), cache_N))

    def decode(self, variables, state: SlotState, num_steps, refill_at):
        """Up to ``num_steps`` (≤ decode_chunk) decode steps over all slots in one program.

        Stops early, after at least one step, once ``refill_at`` slots are free (requests are
        waiting for them: the host refills them in one batched prefill); a value above
        ``num_slots`` stops early only when every slot is idle. Returns the state
        and (steps run, token_KB (-1 where a slot was idle), logprob_KB, expert_ids_KLBK | None,
        finish_B (how each slot that finished in this call finished)).
        """
        K, B = self.decode_chunk, self.num_slots
        probe = jax.eval_shape(
            self.forward, variables, jnp.zeros((B, 1), jnp.int32),
            jnp.zeros((B, 1), jnp.int32), state.cache)
        expert_shape = None if probe[1] is None else probe[1].shape[:1] + (B,) + probe[1].shape[3:]
        outputs = (jnp.full((K, B), -1, jnp.int32), jnp.zeros((K, B), jnp.float32),
                   None if expert_shape is None else jnp.zeros((K, *expert_shape), jnp.int32))

        def cond(carry):
            step, s, _, _ = carry
            num_free = jnp.sum(~s.active_B)
            # (Every slot idle: nothing left to decode.)
            stop = (num_free >= refill_at) | (num_free == B)
            return (step < num_steps) & ~((step > 0) & stop)

        def body(carry):
            step, s, (token_KB, logprob_KB, expert_KLBK), finish_B = carry
            positions_B1 = jnp.where(s.active_B, s.pos_B, -1)[:, None]
            logits_B1V, expert_ids_LB1K, cache = self.forward(
                variables, s.last_token_B[:, None], positions_B1, s.cache)
            token_B, logprob_B, new_finish_B = self._sample_and_finish(
                logits_B1V[:, 0], s.rows, s.num_generated_B, s.pos_B, s.active_B)
            token_KB = token_KB.at[step].set(jnp.where(s.active_B, token_B, -1))
            logprob_KB = logprob_KB.at[step].set(logprob_B)
            if expert_KLBK is not None:
                expert_KLBK = expert_KLBK.at[step].set(expert_ids_LB1K[:, :, 0])
            s = SlotState(
                cache=cache, last_token_B=jnp.where(s.active_B, token_B, s.last_token_B),
                pos_B=s.pos_B + s.active_B, num_generated_B=s.num_generated_B + s.active_B,
                active_B=s.active_B & (new_finish_B == FINISH_NONE), rows=s.rows)
            finish_B = jnp.where(new_finish_B != FINISH_NONE, new_finish_B, finish_B)
            return step + 1, s, (token_KB, logprob_KB, expert_KLBK), finish_B

        step, state, outputs, finish_B = jax.lax.while_loop(
            cond, body, (jnp.int32(0), state, outputs, jnp.zeros((B,), jnp.int32)))
        return state, (step, *outputs, finish_B)

    @staticmethod
    def deactivate(state: SlotState) -> SlotState:
        """Empties every slot (their cache rows are overwritten by the next prefill)."""
        return state.replace(active_B=jnp.zeros_like(state.active_B))

    @staticmethod
    def release(state: SlotState, release_B) -> SlotState:
        """Empties the slots where ``release_B`` (bool [B]) holds: ones the host finished."""
        return state.replace(active_B=state.active_B & ~release_B)

    @staticmethod
    def reactivate(state: SlotState, resume_B) -> SlotState:
        """Resumes the parked slots where ``resume_B`` (bool [B]) holds: their cache rows,
        position, last token and sampling rows were left in place when they were drained."""
        return state.replace(active_B=state.active_B | resume_B)
