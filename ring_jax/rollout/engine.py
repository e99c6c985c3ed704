"""The rollout engine: continuous batching over a fixed set of KV-cache slots (PAPER §2, §3).

Host loop around the two jitted programs of `device_step`:

  * ``add(requests)`` validates and queues requests (new, or resumed with tokens generated under
    earlier policy versions);
  * ``step(token_budget)`` repeatedly (1) prefills waiting requests into free slots (prompt +
    already generated tokens, under the current weights; this samples each one's next token;
    ``prefill_chunk`` runs long prompts through the model a chunk at a time),
    then (2) runs up to ``decode_chunk`` decode steps over all slots in one device program,
    moving back only the sampled tokens, log-probs and (if recorded) expert ids. The decode
    program returns early once ``refill_min_rows`` slots are free while requests wait, so the
    freed slots are refilled together in one prefill call (continuous batching; 1 = refill at
    every finish), and it never runs more steps than the remaining token budget needs;
  * ``drain()`` hands back every unfinished request with everything it has so far;
  * ``load_weights(variables, version)`` casts (and reshards) trainer weights on device; requests
    in flight are re-prefilled under the new weights at the next step, as C3PO++ resumes
    partial rollouts (their earlier tokens keep their log-probs and versions);
  * ``warmup()`` (run at construction with ``warmup_buckets``) compiles the prefill program for
    every (rows, length) bucket and the decode program, so no later step compiles.

Stale KV (``stale_kv``, off by default; PAPER §2 leaves the choice open): requests in flight at
a weight update keep their slots and KV cache, and drained requests park theirs, so a request
added back unchanged (C3PO++'s carried responses) resumes without a prefill. The new weights
then attend over keys/values the old ones computed: a mismatch between log π_infer and the
trainer's recompute that `experiments/benchmarks/c3po.py --calibrate` measures.

Stop strings are matched on the host after each prefill / decode chunk (the engine needs a
``detokenize``): a slot whose decoded response contains one is cut after the token that ended it
(`types.stop_string_cut`), finished with ``FINISH_STOP`` and freed like a stop-token finish;
tokens its slot sampled past that point within the chunk are discarded.

Every generated token records its id, the log-prob of the *raw* (untempered, untruncated)
distribution (`sampling`), the policy version and, with ``record_expert_ids``, the routed expert
ids per MoE layer of the forward step that sampled it.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ring_jax import config as config_lib
from ring_jax import model as model_lib
from ring_jax import sharding as sharding_lib
from ring_jax.rollout import device_step
from ring_jax.rollout import layout as layout_lib
from ring_jax.rollout import precision as precision_lib
from ring_jax.rollout import weight_sync
from ring_jax.rollout.precision import InferencePrecision
from ring_jax.rollout.types import (FINISH_LENGTH, FINISH_STOP, Detokenize, Request,
                                    StepOutput, stop_string_cut)

_FINISH_NAMES = {device_step.FINISH_STOP: FINISH_STOP, device_step.FINISH_LENGTH: FINISH_LENGTH}


class RequestError(ValueError):
    """A request the engine cannot run; nothing was queued (the caller still owns them all)."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    num_slots: int = 8  # sequences decoded together (the decode batch)
    max_len: int = 512  # prompt + response tokens per sequence (the KV cache length)
    decode_chunk: int = 16  # most decode steps per device program / host round trip
    record_expert_ids: bool = False
    max_stop_tokens: int = 8  # stop token ids per request (padded on device)
    min_prefill_len: int = 16  # smallest prompt-length bucket (buckets are powers of two)
    # Smallest row bucket of a prefill (row buckets: min_prefill_rows · 2^k, capped at
    # num_slots). Fewer programs to compile (`warmup`), more padding rows per small refill.
    min_prefill_rows: int = 1
    # A decode chunk returns to refill freed slots once this many are free (or as many as
    # requests wait, if fewer): 1 refills at the first finish (most slot use, most prefill
    # calls); larger values gather refills into fewer, larger prefill calls.
    refill_min_rows: int = 1
    # Compile every prefill (rows, length) bucket and the decode program when the engine is
    # built (`Engine.warmup`), so that no later step compiles.
    warmup_buckets: bool = False
    # Stale KV (PAPER §2 leaves it open): a request in flight at a weight update, or drained
    # and added back unchanged, keeps its KV cache computed by the old weights instead of being
    # re-prefilled under the new ones. Cheaper continuation; adds a mismatch (the new weights
    # attend over old keys/values) that BENCHMARKS.md measures. Off: exact recompute.
    stale_kv: bool = False
    # Chunked prefill: a prefill whose length bucket exceeds this many tokens runs its prompts
    # through the model this many tokens at a time (a loop inside the one prefill program,
    # `device_step.StepFns._prefill_forward`), bounding the activations to [rows, chunk]. The
    # lever for long prompts on a pod: a prefill's rows are split over the devices, so each
    # holds whole prompts whatever the row count. 0: whole prompts in one forward.
    prefill_chunk: int = 0

    def __post_init__(self):
        config_lib.check_int("num_slots", self.num_slots, min_value=1)
        config_lib.check_int("max_len", self.max_len, min_value=2)
        config_lib.check_int("decode_chunk", self.decode_chunk, min_value=1)
        config_lib.check_int("max_stop_tokens", self.max_stop_tokens, min_value=1)
        config_lib.check_int("min_prefill_len", self.min_prefill_len, min_value=1)
        config_lib.check_int("min_prefill_rows", self.min_prefill_rows, min_value=1,
                             max_value=self.num_slots)
        config_lib.check_int("refill_min_rows", self.refill_min_rows, min_value=1,
                             max_value=self.num_slots)
        config_lib.check_one_of("warmup_buckets", self.warmup_buckets, (False, True))
        config_lib.check_one_of("stale_kv", self.stale_kv, (False, True))
        config_lib.check_int("prefill_chunk", self.prefill_chunk, min_value=0,
                             max_value=self.max_len)

    def prefill_buckets(self) -> list[tuple[int, int]]:
        """Every (rows, length) shape the prefill program can be called with."""
        rows = sorted({_bucket(n, self.min_prefill_rows, self.num_slots)
                       for n in range(1, self.num_slots + 1)})
        # A prefilled sequence has 1 .. max_len - 1 tokens.
        lengths = sorted({_bucket(n, self.min_prefill_len, self.max_len)
                          for n in range(1, self.max_len)})
        return [(N, T) for N in rows for T in lengths]


def _bucket(n: int, smallest: int, largest: int) -> int:
    """The smallest power-of-two multiple of ``smallest`` ≥ n, capped at ``largest``."""
    return min(largest, smallest * 2 ** max(0, math.ceil(math.log2(max(n, 1) / smallest))))


@dataclasses.dataclass
class _Slot:
    """A request in a slot and what it generated since it was (re)inserted."""

    request: Request
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    expert_ids: list[np.ndarray] = dataclasses.field(default_factory=list)
    checked: int = -1  # generated tokens known not to end a stop string (-1: those it came with)

    def __post_init__(self):
        if self.checked < 0:
            self.checked = self.request.num_generated

    def record(self, token: int, logprob: float, version: int,
               expert_ids: np.ndarray | None) -> None:
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.versions.append(version)
        if expert_ids is not None:
            self.expert_ids.append(expert_ids)

    def cut_at_stop_string(self, detokenize: Detokenize | None) -> int | None:
        """Drops the tokens after a stop string ended; returns how many were dropped, or None
        when no stop string ended in the tokens recorded since the last call."""
        sampling = self.request.sampling
        if not sampling.stop_strings:
            return None
        tokens = np.concatenate([np.asarray(self.request.tokens, np.int32),
                                 np.asarray(self.tokens, np.int32)])
        keep = stop_string_cut(tokens, sampling, detokenize, checked=self.checked)
        self.checked = len(tokens)
        if keep is None:
            return None
        keep -= self.request.num_generated
        dropped = len(self.tokens) - keep
        del self.tokens[keep:], self.logprobs[keep:], self.versions[keep:]
        del self.expert_ids[keep:]
        return dropped

    def flush(self, finish_reason: str | None = None) -> Request:
        """The request with everything generated so far appended (a new object)."""
        r = self.request
        expert_ids = r.expert_ids
        # Expert ids stay aligned with tokens: a request resumed without them (an engine that
        # did not record) keeps none.
        if self.expert_ids and (expert_ids is not None or r.num_generated == 0):
            new = np.stack(self.expert_ids).astype(np.int32)
            expert_ids = new if expert_ids is None else np.concatenate([expert_ids, new])
        return dataclasses.replace(
            r, tokens=np.concatenate([r.tokens, np.asarray(self.tokens, np.int32)]),
            logprobs=np.concatenate([r.logprobs, np.asarray(self.logprobs, np.float32)]),
            versions=np.concatenate([r.versions, np.asarray(self.versions, np.int32)]),
            expert_ids=expert_ids, finish_reason=finish_reason)


class Engine:
    """Continuous-batching generation over ``num_slots`` KV-cache slots (module docstring).

    ``forward(variables, tokens_BT, positions_BT, cache) -> (logits_BTV, expert_ids_LBTK | None,
    cache)`` and ``init_cache(batch, max_len)`` define the model; `from_model` builds them from
    a ring_jax ``ModelConfig`` with the inference precision policy. ``prepare_weights`` maps
    trainer variables to the engine's (cast, quantized, sharded); it runs jitted on device.
    ``detokenize`` (token ids -> text, e.g. ``tokenizer.decode``) is needed by requests with
    ``stop_strings``.
    """

    def __init__(self, forward, init_cache, variables: Any, config: EngineConfig, *,
                 vocab_size: int, prepare_weights=None, version: int = 0, mesh: Any = None,
                 weight_sharding: Any = None, state_sharding: Any = None,
                 detokenize: Detokenize | None = None):
        self.config = config
        self._detokenize = detokenize
        self.num_slots = config.num_slots
        self.vocab_size = vocab_size
        self.version = version
        self._mesh = mesh
        self._fns = step_fns(forward, init_cache, config)
        prepare_weights = prepare_weights or (lambda v, version: v)
        self._prepare = weight_sync.WeightSync(prepare_weights, weight_sharding)
        self._prefill, self._decode = jit_programs(self._fns, state_sharding)
        self._deactivate = jax.jit(self._fns.deactivate, donate_argnums=0,
                                   out_shardings=state_sharding)
        self._release = jax.jit(self._fns.release, donate_argnums=0,
                                out_shardings=state_sharding)
        self._reactivate = jax.jit(self._fns.reactivate, donate_argnums=0,
                                   out_shardings=state_sharding)
        with self._mesh_context():
            self._state = jax.jit(self._fns.empty_state, out_shardings=state_sharding)()
            self._variables = self._prepare(variables, version)
        self._pending: collections.deque[Request] = collections.deque()
        self._slots: list[_Slot | None] = [None] * config.num_slots
        # stale_kv: slot -> the request drained from it, whose KV rows are still in place.
        self._parked: dict[int, Request] = {}
        self._stats: collections.Counter[str] = collections.Counter()
        if config.warmup_buckets:
            self.warmup()

    # ------------------------------------------------------------------ public API

    def pop_stats(self) -> dict[str, float]:
        """Work done since the last call, for telling where rollout time goes:

          prefill_calls, prefill_s          prefill programs run and their wall time
          prefill_tokens                    prompt + earlier-generated tokens prefilled
          prefill_resumed_tokens            of those, tokens a resumed request had generated
                                            before (recomputed under the current weights)
          prefill_padded_tokens             the prefills' bucketed N × T
          decode_calls, decode_s            decode programs run and their wall time
          decode_steps                      decode steps (each over every slot)
          decode_tokens                     tokens they sampled; / (decode_steps × num_slots)
                                            is the slots' utilisation
          resumed_in_place                  stale_kv: requests resumed in their parked slot
                                            (no prefill)
        """
        out = {k: float(v) for k, v in self._stats.items()}
        self._stats.clear()
        return out

    def add(self, requests: Sequence[Request]) -> None:
        """Queues requests (resumed ones keep their tokens); all or none (`RequestError`)."""
        in_flight = {r.request_id for r in self._pending}
        in_flight |= {s.request.request_id for s in self._slots if s is not None}
        problems = []
        for r in requests:
            problem = self._check(r)
            if problem is None and r.request_id in in_flight:
                problem = "a request with this id is already in the engine"
            in_flight.add(r.request_id)
            if problem is not None:
                problems.append(f"request {r.request_id!r}: {problem}")
        if problems:
            raise RequestError("no request was queued; " + "; ".join(problems))
        self._pending.extend(requests)

    def step(self, token_budget: int | None = None) -> StepOutput:
        """Generates until ``token_budget`` new tokens are spent or nothing is left.

        One decode step makes at most ``num_slots`` tokens, so the budget may be overshot by
        fewer than ``num_slots`` tokens. Unfinished requests stay in the engine (`drain`).
        ``num_new_tokens`` counts the tokens the requests kept: tokens sampled past a stop string
        are discarded and neither counted nor spent, so it always equals the growth of the
        requests' ``num_generated``.
        """
        if token_budget is not None and (isinstance(token_budget, bool)
                                         or not isinstance(token_budget, int)
                                         or token_budget <= 0):
            raise ValueError(f"token_budget={token_budget!r} is invalid: must be a positive int "
                             "or None (no request was touched)")
        finished: list[Request] = []
        spent = 0
        while token_budget is None or spent < token_budget:
            spent += self._fill_free_slots(finished)
            num_active = sum(s is not None for s in self._slots)
            if num_active == 0 and self._pending:
                continue  # every new request finished at its first token
            if num_active == 0 or (token_budget is not None and spent >= token_budget):
                break
            num_steps = self.config.decode_chunk
            if token_budget is not None:
                num_steps = min(num_steps, -(-(token_budget - spent) // num_active))
            spent += self._decode_chunk(num_steps, finished)
        num_in_flight = len(self._pending) + sum(s is not None for s in self._slots)
        return StepOutput(finished=finished, num_new_tokens=spent, num_in_flight=num_in_flight)

    def drain(self) -> list[Request]:
        """Removes and returns every unfinished request (active ones first), with all it has.

        With ``stale_kv`` the drained requests' slots are parked: a later `add` of the same
        request (same id, tokens, sampling) resumes it in its slot without a prefill, unless a
        new request needed the slot first.
        """
        drained = []
        for b, slot in enumerate(self._slots):
            if slot is not None:
                drained.append(slot.flush())
                if self.config.stale_kv:
                    self._parked[b] = drained[-1]
        drained.extend(self._pending)
        self._pending.clear()
        self._slots = [None] * self.num_slots
        with self._mesh_context():
            self._state = self._deactivate(self._state)
        return drained

    def load_weights(self, variables: Any, version: int) -> None:
        """Installs trainer ``variables`` (cast/sharded on device) as policy ``version``.

        ``variables`` is the model's full variable dict, {'params': ..., 'router': ...} as
        `Transformer.init` returns it (the router's expert bias changes every train step, so it
        is part of the sync). It runs on device, no host copy (`weight_sync.WeightSync`): the
        trainer's arrays are cast in their own layout, then moved device to device into the
        engine's.

        Requests in flight are re-prefilled under the new weights at the next `step` (their
        KV cache was computed by the old ones); their tokens so far keep their old versions.
        With ``stale_kv`` they keep their slots and KV cache instead, and go on decoding.
        """
        with self._mesh_context():
            self._variables = self._prepare(variables, version)
        self.version = version
        if self.config.stale_kv:
            return
        requeued = [s.flush() for s in self._slots if s is not None]
        self._slots = [None] * self.num_slots
        with self._mesh_context():
            self._state = self._deactivate(self._state)
        self._pending.extendleft(reversed(requeued))

    @classmethod
    def from_model(cls, model_cfg: Any, variables: Any, config: EngineConfig,
                   precision: InferencePrecision = InferencePrecision(), *, version: int = 0,
                   moe_impl: str = "dropless_capacity", mesh: Any = None,
                   detokenize: Detokenize | None = None) -> "Engine":
        """An engine for a ring_jax `Transformer` under an inference precision policy.

        The engine's model is ``model_cfg`` with the policy's dtype (params, activations, KV
        cache) and a dropless MoE dispatch: ``moe_impl="dropless_capacity"`` (capacity sized
        per call from the batch's per-expert counts, falling back to C = all tokens when an
        expert would overflow: ~2× the routed FLOPs on a typical batch), ``"capacity"`` with
        C = all tokens of the call (capacity_factor ≥ E/K: E/K× the routed FLOPs), or
        ``"ragged"``. A dispatch that can drop tokens would make a token's output depend on
        which other tokens share its batch. (On CPU the capacity paths are ~8× faster at
        decode batch sizes than ragged_dot.)
        ``variables`` are trainer variables, converted by `precision.prepare_variables`. With a
        ``mesh`` (`ring_jax.sharding.make_mesh`), weights are laid out by the logical-axis rules
        (experts over ``expert``), the slots over the batch mesh axes that divide their count
        and the KV cache's length over the batch axes left (`layout`). ``detokenize``
        enables stop strings (`Engine`).
        """
        m = model_functions(model_cfg, config, precision, moe_impl=moe_impl, mesh=mesh)
        return cls(m.forward, m.init_cache, variables, config, vocab_size=m.vocab_size,
                   prepare_weights=m.prepare_weights, version=version, mesh=mesh,
                   weight_sharding=m.weight_sharding, state_sharding=m.state_sharding,
                   detokenize=detokenize)

    @property
    def variables(self) -> Any:
        """The engine's current (inference-precision) weights."""
        return self._variables

    def warmup(self) -> None:
        """Compiles (by running on padding rows, which change nothing) the prefill program for
        every (rows, length) bucket of `EngineConfig.prefill_buckets` and the decode, release
        and reactivate programs, so no later `step` compiles. Slots and requests are kept."""
        cfg = self.config
        with self._mesh_context():
            for N, T in cfg.prefill_buckets():
                rows = self._sampling_rows([Request("warmup", np.ones((1,), np.int32))], N)
                self._state, _ = self._prefill(
                    self._variables, self._state, np.zeros((N, T), np.int32),
                    np.ones((N,), np.int32), np.full((N,), self.num_slots, np.int32),
                    np.zeros((N,), np.int32), rows)
            self._state, _ = self._decode(self._variables, self._state, np.int32(0),
                                          np.int32(self.num_slots + 1))
            none_B = np.zeros((self.num_slots,), bool)
            self._state = self._release(self._state, none_B)
            self._state = jax.block_until_ready(self._reactivate(self._state, none_B))

    # ------------------------------------------------------------------ internals

    def _mesh_context(self):
        if self._mesh is None:
            return contextlib.nullcontext()
        return sharding_lib.use_mesh(self._mesh)

    def _check(self, r: Request) -> str | None:
        """Why ``r`` cannot run, or None."""
        prompt = np.asarray(r.prompt_tokens)
        generated = np.asarray(r.tokens)
        if r.finished:
            return f"already finished ({r.finish_reason!r})"
        if prompt.ndim != 1 or prompt.shape[0] == 0:
            return f"prompt must be a non-empty 1-D token array, got shape {prompt.shape}"
        if not np.issubdtype(prompt.dtype, np.integer):
            return f"prompt tokens must be integers, got {prompt.dtype}"
        for name, tokens in (("prompt", prompt), ("generated", generated)):
            if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
                return (f"{name} token ids must be in [0, {self.vocab_size}), got range "
                        f"[{tokens.min()}, {tokens.max()}]")
        if not (len(r.logprobs) == len(r.versions) == generated.shape[0]):
            return "tokens, logprobs and versions must have the same length"
        length = prompt.shape[0] + generated.shape[0]
        if length >= self.config.max_len:
            return (f"prompt + generated tokens = {length} leaves no room for a new token "
                    f"within max_len={self.config.max_len}")
        if generated.shape[0] >= r.sampling.max_new_tokens:
            return (f"already has {generated.shape[0]} tokens >= max_new_tokens="
                    f"{r.sampling.max_new_tokens}")
        if len(r.sampling.stop_token_ids) > self.config.max_stop_tokens:
            return (f"{len(r.sampling.stop_token_ids)} stop tokens > engine max_stop_tokens="
                    f"{self.config.max_stop_tokens}")
        if r.sampling.stop_strings and self._detokenize is None:
            return ("has stop_strings but the engine has no detokenize (pass detokenize= to "
                    "Engine / Engine.from_model)")
        if not 0 <= r.seed < 2**32:
            return f"seed={r.seed} must be in [0, 2**32)"
        return None

    def _resume_parked(self) -> None:
        """stale_kv: waiting requests that left a parked slot unchanged go back into it."""
        resume_B = np.zeros((self.num_slots,), bool)
        waiting = collections.deque()
        for r in self._pending:
            b = next((b for b, p in self._parked.items() if _same_request(p, r)), None)
            if b is None:
                waiting.append(r)
                continue
            del self._parked[b]
            self._slots[b] = _Slot(r)
            resume_B[b] = True
        if resume_B.any():
            self._pending = waiting
            self._stats.update(resumed_in_place=int(resume_B.sum()))
            with self._mesh_context():
                self._state = self._reactivate(self._state, resume_B)

    def _fill_free_slots(self, finished: list[Request]) -> int:
        """Prefills waiting requests into free slots in one call; returns the number of tokens
        sampled."""
        if self._parked:
            self._resume_parked()
        # Slots holding no parked KV first; a parked one is given up only when needed.
        free = sorted((i for i, s in enumerate(self._slots) if s is None),
                      key=lambda i: i in self._parked)
        batch = [self._pending.popleft() for _ in range(min(len(free), len(self._pending)))]
        if not batch:
            return 0
        for b in free[:len(batch)]:
            self._parked.pop(b, None)
        N = _bucket(len(batch), self.config.min_prefill_rows, self.num_slots)
        seqs = [np.concatenate([np.asarray(r.prompt_tokens, np.int32),
                                np.asarray(r.tokens, np.int32)]) for r in batch]
        T = _bucket(max(len(s) for s in seqs), self.config.min_prefill_len, self.config.max_len)
        tokens_NT = np.zeros((N, T), np.int32)
        length_N = np.ones((N,), np.int32)
        slot_N = np.full((N,), self.num_slots, np.int32)  # out of range: padding row
        num_generated_N = np.zeros((N,), np.int32)
        for n, (r, seq) in enumerate(zip(batch, seqs)):
            tokens_NT[n, :len(seq)] = seq
            length_N[n] = len(seq)
            slot_N[n] = free[n]
            num_generated_N[n] = r.num_generated
        start = time.perf_counter()
        with self._mesh_context():
            self._state, out = self._prefill(
                self._variables, self._state, tokens_NT, length_N, slot_N, num_generated_N,
                self._sampling_rows(batch, N))
        token_N, logprob_N, expert_ids_LNK, finish_N = jax.device_get(out)
        self._stats.update(prefill_calls=1, prefill_s=time.perf_counter() - start,
                           prefill_tokens=int(length_N[:len(batch)].sum()),
                           prefill_resumed_tokens=int(num_generated_N.sum()),
                           prefill_padded_tokens=N * T)
        release_B = np.zeros((self.num_slots,), bool)
        for n, r in enumerate(batch):
            slot = _Slot(r)
            slot.record(int(token_N[n]), float(logprob_N[n]), self.version,
                        None if expert_ids_LNK is None else expert_ids_LNK[:, n])
            if slot.cut_at_stop_string(self._detokenize) is not None:
                finished.append(slot.flush(FINISH_STOP))
                release_B[free[n]] = not finish_N[n]  # the device still thinks it runs
            elif finish_N[n]:
                finished.append(slot.flush(_FINISH_NAMES[int(finish_N[n])]))
            else:
                self._slots[free[n]] = slot
        self._release_slots(release_B)
        return len(batch)

    def _decode_chunk(self, num_steps: int, finished: list[Request]) -> int:
        """Runs up to ``num_steps`` decode steps; returns the number of tokens generated."""
        start = time.perf_counter()
        # Requests waiting: return once enough slots are free to refill them in one prefill.
        refill_at = (min(self.config.refill_min_rows, len(self._pending)) if self._pending
                     else self.num_slots + 1)
        with self._mesh_context():
            self._state, out = self._decode(self._variables, self._state, np.int32(num_steps),
                                            np.int32(refill_at))
        steps, token_KB, logprob_KB, expert_KLBK, finish_B = jax.device_get(out)
        self._stats.update(decode_calls=1, decode_s=time.perf_counter() - start,
                           decode_steps=int(steps), decode_tokens=int((token_KB >= 0).sum()))
        token_KB, logprob_KB = token_KB[:steps], logprob_KB[:steps]
        generated = 0
        release_B = np.zeros((self.num_slots,), bool)
        for b, slot in enumerate(self._slots):
            if slot is None:
                continue
            for k in np.flatnonzero(token_KB[:, b] >= 0):
                slot.record(int(token_KB[k, b]), float(logprob_KB[k, b]), self.version,
                            None if expert_KLBK is None else expert_KLBK[k, :, b])
                generated += 1
            dropped = slot.cut_at_stop_string(self._detokenize)
            if dropped is not None:
                generated -= dropped
                finished.append(slot.flush(FINISH_STOP))
                self._slots[b] = None
                release_B[b] = not finish_B[b]
            elif finish_B[b]:
                finished.append(slot.flush(_FINISH_NAMES[int(finish_B[b])]))
                self._slots[b] = None
        self._release_slots(release_B)
        return generated

    def _release_slots(self, release_B: np.ndarray) -> None:
        """Frees on device the slots the host finished (stop strings)."""
        if release_B.any():
            with self._mesh_context():
                self._state = self._release(self._state, release_B)

    def _sampling_rows(self, batch: Sequence[Request], N: int) -> device_step.SamplingRows:
        stop_NS = np.full((N, self.config.max_stop_tokens), -1, np.int32)
        params = [r.sampling for r in batch] + [batch[0].sampling] * (N - len(batch))
        for n, p in enumerate(params):
            stop_NS[n, :len(p.stop_token_ids)] = p.stop_token_ids
        seeds = [r.seed for r in batch] + [0] * (N - len(batch))
        return device_step.SamplingRows(
            seed_B=np.asarray(seeds, np.uint32),
            temperature_B=np.asarray([p.temperature for p in params], np.float32),
            top_k_B=np.asarray([p.top_k for p in params], np.int32),
            top_p_B=np.asarray([p.top_p for p in params], np.float32),
            greedy_B=np.asarray([p.greedy for p in params], bool),
            min_new_B=np.asarray([p.min_new_tokens for p in params], np.int32),
            max_new_B=np.asarray([p.max_new_tokens for p in params], np.int32),
            stop_BS=stop_NS)


def _same_request(parked: Request, r: Request) -> bool:
    """Whether ``r`` is the request drained from a parked slot, unchanged since."""
    return (r.request_id == parked.request_id and r.seed == parked.seed
            and r.sampling == parked.sampling and r.num_generated == parked.num_generated
            and np.array_equal(r.prompt_tokens, parked.prompt_tokens)
            and np.array_equal(r.tokens, parked.tokens))


@dataclasses.dataclass(frozen=True)
class ModelFunctions:
    """What `Engine.from_model` builds from a ``ModelConfig``: the cached forward, the empty
    cache, the trainer → engine weight conversion and (with a mesh) the weights' and slot
    state's shardings. Also what the ahead-of-time planner (`ring_jax.plan`) compiles."""

    forward: Any
    init_cache: Any
    prepare_weights: Any
    vocab_size: int
    weight_sharding: Any = None
    state_sharding: Any = None


def model_functions(model_cfg: Any, config: EngineConfig,
                    precision: InferencePrecision = InferencePrecision(), *,
                    moe_impl: str = "dropless_capacity", mesh: Any = None) -> ModelFunctions:
    """The engine's model under an inference precision policy (see `Engine.from_model`)."""
    moe = {}
    if model_cfg.is_moe:
        moe = dict(moe_impl=moe_impl)
        if moe_impl == "capacity":  # C = all tokens of the call
            dropless = model_cfg.num_experts / model_cfg.num_experts_per_tok
            moe["capacity_factor"] = max(model_cfg.capacity_factor, float(dropless))
    cfg = dataclasses.replace(model_cfg, dtype=precision.dtype, param_dtype=precision.dtype,
                              **moe)
    module = model_lib.Transformer(cfg)
    record = config.record_expert_ids and cfg.is_moe

    # With a mesh the forward traces under the engine's own rules (`layout`): slots and the
    # cache length split over the batch axes, as the slot state is laid out.
    rules = None
    if mesh is not None:
        rules = layout_lib.engine_layout(mesh, config.num_slots, config.max_len).rules()

    def forward(variables, tokens_BT, positions_BT, cache):
        with contextlib.nullcontext() if rules is None else nn.logical_axis_rules(rules):
            logits_BTV, aux, cache = module.apply(variables, tokens_BT,
                                                  positions_BT=positions_BT, cache=cache,
                                                  return_expert_ids=record)
        return logits_BTV, aux["expert_ids"] if record else None, cache

    def init_cache(batch, max_len):
        return model_lib.init_cache(cfg, batch, max_len, precision.jnp_dtype)

    def prepare(variables, version):
        return precision_lib.prepare_variables(variables, precision, version)

    weight_sharding = state_sharding = None
    if mesh is not None:
        with sharding_lib.use_mesh(mesh):
            tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
            weight_sharding = sharding_lib.param_shardings(
                mesh, sharding_lib.param_logical_axes(module, tokens))
            state_sharding = _slot_state_sharding(mesh, cfg, rules)
    return ModelFunctions(forward, init_cache, prepare, cfg.vocab_size, weight_sharding,
                          state_sharding)


def step_fns(forward: Any, init_cache: Any, config: EngineConfig) -> device_step.StepFns:
    """The device programs' builder for a model (``forward``, ``init_cache(batch, max_len)``)."""
    return device_step.StepFns(
        forward=forward, init_cache=lambda b: init_cache(b, config.max_len),
        num_slots=config.num_slots, max_len=config.max_len,
        max_stop_tokens=config.max_stop_tokens, decode_chunk=config.decode_chunk,
        prefill_chunk=config.prefill_chunk)


def jit_programs(fns: device_step.StepFns, state_sharding: Any = None) -> tuple[Any, Any]:
    """The jitted prefill and decode programs; the slot state is donated (updated in place)
    and, with ``state_sharding``, kept in that layout. The host reads the sampled tokens,
    log-probs and expert ids: with a mesh they come out replicated, so every process (a global
    engine spans several) holds all of them."""
    state_kw = {}
    if state_sharding is not None:
        mesh = jax.tree.leaves(state_sharding)[0].mesh
        state_kw = {"out_shardings": (state_sharding, NamedSharding(mesh, P()))}
    return (jax.jit(fns.prefill, donate_argnums=1, **state_kw),
            jax.jit(fns.decode, donate_argnums=1, **state_kw))


def _slot_state_sharding(mesh, cfg, rules) -> device_step.SlotState:
    """Slots (and their cache rows) split over the engine layout's slot axes, the cache's length
    over its cache axes (`layout.EngineLayout`); the rest replicated."""
    cache = sharding_lib.param_shardings(mesh, model_lib.cache_logical_axes(cfg), rules)
    slot_axes = sharding_lib.spec_for(("act_batch",), mesh, rules)[0]
    row, rows2 = NamedSharding(mesh, P(slot_axes)), NamedSharding(mesh, P(slot_axes, None))
    return device_step.SlotState(
        cache=cache, last_token_B=row, pos_B=row, num_generated_B=row, active_B=row,
        rows=device_step.SamplingRows(seed_B=row, temperature_B=row, top_k_B=row, top_p_B=row,
                                      greedy_B=row, min_new_B=row, max_new_B=row, stop_BS=rows2))
