"""A fake rollout engine with scripted response lengths, for scheduler tests and benchmarks.

`FakeEngine` honours `ring_jax.rollout.types.EngineProtocol` exactly as the real engine does:
``num_slots`` decode slots refilled continuously from a FIFO pending queue, one token per active
slot per decode step, ``step(token_budget)`` stops at the first decode-step boundary at or past
the budget (overshoot < ``num_slots``), every token stamped with the current ``version``, and a
resumed request continues where it stopped. Token ids, log-probs and expert ids are pure
functions of (request seed, token index), and the response length of a request is
``length_fn(request)`` — so a schedule is reproducible and tests can check every recorded value.

With ``decode_step_s`` / ``prefill_token_s`` / ``prefill_call_s`` it also *simulates* device time
(sleeping), which `experiments/benchmarks/c3po.py` uses when no real engine is at hand; its
``--calibrate`` sets them from the real engine's measured costs. ``refill_min_rows`` gathers
refills as the real engine's `EngineConfig.refill_min_rows` does.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Sequence

import numpy as np

from ring_jax.rollout.types import FINISH_LENGTH, FINISH_STOP, Request, StepOutput


class FakeEngineError(RuntimeError):
    """Raised by `FakeEngine` when told to fail (exception-injection tests)."""


def fake_token(seed: int, index: int, vocab_size: int) -> int:
    """Token id ≥ 1 (0 is padding) of generated token ``index`` of the request with ``seed``."""
    return 1 + (seed * 1_000_003 + index * 7_919) % (vocab_size - 1)


def fake_logprob(seed: int, index: int) -> float:
    return -0.01 - ((seed + 31 * index) % 97) / 10.0


def fake_expert_ids(seed: int, index: int, shape: tuple[int, int],
                    num_experts: int) -> np.ndarray:
    L, K = shape
    return ((seed + index + np.arange(L * K)) % num_experts).astype(np.int32).reshape(L, K)


class FakeEngine:
    """Scripted-length engine (module docstring).

    Args:
      num_slots: concurrent decode slots.
      length_fn: ``length_fn(request) -> int``, the response length the request would reach
        without ``max_new_tokens``; above it the response is cut with finish_reason "length".
      version: initial policy version.
      expert_ids_shape: (L_moe, K) to record routed experts per token, else None.
      decode_step_s, prefill_token_s: simulated device seconds per decode step and per token
        (re-)prefilled when a request takes a slot (a resumed one re-prefills prompt + output).
      prefill_call_s: simulated fixed seconds per refill (one prefill call, however many rows;
        a refill sleeps once, for its call and all its tokens).
      refill_min_rows: refill free slots only once this many are free (or every waiting
        request fits, or no slot is busy).
      fail_on_step: raise `FakeEngineError` on this (0-based) call of `step`.
    """

    def __init__(self, num_slots: int, length_fn: Callable[[Request], int], *, version: int = 0,
                 vocab_size: int = 1000, expert_ids_shape: tuple[int, int] | None = None,
                 num_experts: int = 16, decode_step_s: float = 0.0,
                 prefill_token_s: float = 0.0, prefill_call_s: float = 0.0,
                 refill_min_rows: int = 1, fail_on_step: int | None = None):
        self.num_slots = num_slots
        self.version = version
        self._length_fn = length_fn
        self._vocab_size = vocab_size
        self._expert_ids_shape = expert_ids_shape
        self._num_experts = num_experts
        self._decode_step_s = decode_step_s
        self._prefill_token_s = prefill_token_s
        self._prefill_call_s = prefill_call_s
        self._refill_min_rows = refill_min_rows
        self._fail_on_step = fail_on_step
        self._active: list[Request] = []
        self._pending: collections.deque[Request] = collections.deque()
        self._targets: dict[str, int] = {}
        self.num_step_calls = 0
        self.num_decode_steps = 0
        self.loaded_versions: list[int] = []

    def add(self, requests: Sequence[Request]) -> None:
        for request in requests:
            if request.finished:
                raise ValueError(f"request {request.request_id} is already finished")
            self._pending.append(request)

    def _refill(self) -> None:
        free = self.num_slots - len(self._active)
        if not self._pending or (self._active and free < min(self._refill_min_rows,
                                                             len(self._pending))):
            return
        num_tokens = 0
        while self._pending and len(self._active) < self.num_slots:
            request = self._pending.popleft()
            self._targets[request.request_id] = min(int(self._length_fn(request)),
                                                    request.sampling.max_new_tokens)
            num_tokens += request.prompt_tokens.shape[0] + request.num_generated
            self._active.append(request)
        # One prefill call for the whole refill, as the real engine's (and one sleep: many
        # short sleeps would each pay the OS's wake-up latency).
        if self._prefill_call_s or self._prefill_token_s:
            time.sleep(self._prefill_call_s + self._prefill_token_s * num_tokens)

    def step(self, token_budget: int | None = None) -> StepOutput:
        call = self.num_step_calls
        self.num_step_calls += 1
        if self._fail_on_step is not None and call == self._fail_on_step:
            raise FakeEngineError(f"injected engine failure at step call {call}")
        finished: list[Request] = []
        spent = 0
        while True:
            self._refill()
            if not self._active or (token_budget is not None and spent >= token_budget):
                break
            still_active = []
            for request in self._active:
                i = request.num_generated
                experts = (None if self._expert_ids_shape is None else fake_expert_ids(
                    request.seed, i, self._expert_ids_shape, self._num_experts))
                request.append(fake_token(request.seed, i, self._vocab_size),
                               fake_logprob(request.seed, i), self.version, experts)
                spent += 1
                target = self._targets[request.request_id]
                if request.num_generated >= target:
                    full = int(self._length_fn(request))
                    request.finish_reason = FINISH_STOP if full <= target else FINISH_LENGTH
                    del self._targets[request.request_id]
                    finished.append(request)
                else:
                    still_active.append(request)
            self._active = still_active
            self.num_decode_steps += 1
            if self._decode_step_s:
                time.sleep(self._decode_step_s)
        return StepOutput(finished=finished, num_new_tokens=spent,
                          num_in_flight=len(self._active) + len(self._pending))

    def drain(self) -> list[Request]:
        out = self._active + list(self._pending)
        self._active, self._pending = [], collections.deque()
        self._targets.clear()
        return out

    def load_weights(self, params: Any, version: int) -> None:
        self.version = int(version)
        self.loaded_versions.append(int(version))


def grpo_advantages(rewards_G: np.ndarray) -> np.ndarray:
    """Plain GRPO group-normalised advantages (r - mean) / (std + 1e-6), for tests and the
    benchmark; the RL engineer's `ring_jax.rl` estimators are the real ones."""
    rewards_G = np.asarray(rewards_G, np.float32)
    return (rewards_G - rewards_G.mean()) / (rewards_G.std() + 1e-6)


def prompt_records(num_prompts: int, *, seed: int = 0, min_len: int = 2,
                   max_len: int = 8, vocab_size: int = 1000):
    """A finite list of prompt records with random token ids (and an ``answer`` field)."""
    rng = np.random.default_rng(seed)
    return [{"prompt_id": i,
             "prompt_tokens": rng.integers(1, vocab_size, int(rng.integers(min_len, max_len + 1)),
                                           dtype=np.int32),
             "answer": str(i % 7)}
            for i in range(num_prompts)]


class ListPromptIterator:
    """A checkpointable iterator over a list of prompt records (get_state / set_state)."""

    def __init__(self, records: Sequence[dict[str, Any]]):
        self._records = list(records)
        self._position = 0

    def __iter__(self) -> ListPromptIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._position >= len(self._records):
            raise StopIteration
        self._position += 1
        return self._records[self._position - 1]

    def get_state(self) -> dict[str, int]:
        return {"position": self._position}

    def set_state(self, state: dict[str, int]) -> None:
        self._position = int(state["position"])


def run_training(scheduler: Any, *, max_batches: int | None = None,
                 updates_per_batch: int = 1, step_delay_s: float = 0.0,
                 metrics: list[dict[str, float]] | None = None) -> list[dict[str, np.ndarray]]:
    """Plays the trainer: takes batches, publishes ``updates_per_batch`` new versions after each
    (after sleeping ``step_delay_s``, a stand-in for the train step).

    Each returned batch also holds ``train_version`` (the scheduler's version when the batch was
    taken, i.e. the policy the trainer would update with it). Per-batch `pop_metrics()` dicts are
    appended to ``metrics`` when given.
    """
    batches = []
    while max_batches is None or len(batches) < max_batches:
        try:
            batch = scheduler.next_batch()
        except StopIteration:
            break
        batch["train_version"] = np.int32(scheduler.version)
        batches.append(batch)
        if metrics is not None:
            metrics.append(scheduler.pop_metrics())
        if step_delay_s:
            time.sleep(step_delay_s)
        for _ in range(updates_per_batch):
            scheduler.update_weights(None, scheduler.version + 1)
    return batches


class ScriptedLengthEngine:
    """Wraps a real engine so response lengths follow ``length_fn`` (benchmarks: a random-weight
    model has no meaningful stop token, so the long-tailed length mix is scripted through each
    request's ``max_new_tokens``; the device work — prefill, decode, re-prefill on resume — is
    the real engine's)."""

    def __init__(self, engine: Any, length_fn: Callable[[Request], int]):
        self._engine = engine
        self._length_fn = length_fn
        self.num_slots = engine.num_slots

    @property
    def version(self) -> int:
        return self._engine.version

    def add(self, requests: Sequence[Request]) -> None:
        for request in requests:
            n = min(int(self._length_fn(request)), request.sampling.max_new_tokens)
            request.sampling = dataclasses.replace(request.sampling, max_new_tokens=n,
                                                   min_new_tokens=n, stop_token_ids=())
        self._engine.add(requests)

    def step(self, token_budget: int | None = None) -> StepOutput:
        return self._engine.step(token_budget)

    def drain(self) -> list[Request]:
        return self._engine.drain()

    def load_weights(self, params: Any, version: int) -> None:
        self._engine.load_weights(params, version)
