"""The contract between the rollout engine and whatever drives it (the C3PO++ scheduler).

Host-side, numpy-only types: the scheduler (and its tests, with a fake engine) use them without
touching a device. A `Request` carries everything generated for it so far, so it can leave the
engine unfinished (C3PO++ budget cut, `drain()`), sit in a buffer across policy versions, and be
resumed later by re-prefilling prompt + generated tokens under the new weights (PAPER §2).

Per generated token t the request records (PAPER §1 needs all of them):
  * ``tokens[t]``      the sampled token id;
  * ``logprobs[t]``    log π_infer(token) of the engine's *untempered, untruncated* distribution
                       (log-softmax of the raw logits, before temperature / top-k / top-p), so it
                       is comparable with the trainer's log π_train(θ_old) for the IcePop ratio k;
  * ``versions[t]``    the policy version of the weights that sampled it;
  * ``expert_ids[t]``  optionally, the routed experts per MoE layer, int32 [L_moe, K], of the
                       forward step that sampled token t (its input is the token at position
                       P + t - 1), for router replay and expert-flip metrics.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ring_jax import config as config_lib

FINISH_STOP = "stop"  # a stop token (or stop string) was produced
FINISH_LENGTH = "length"  # max_new_tokens reached, or the engine's max length


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples. ``greedy`` ignores temperature / top-k / top-p."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k truncation
    greedy: bool = False
    min_new_tokens: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    # Stop strings end a response whose decoded text contains one (needs an engine built with
    # a ``detokenize``; see `stop_string_cut`).
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        config_lib.check_float("temperature", self.temperature, min_value=0.0,
                               min_exclusive=True)
        config_lib.check_float("top_p", self.top_p, min_value=0.0, max_value=1.0,
                               min_exclusive=True)
        config_lib.check_int("top_k", self.top_k, min_value=0)
        config_lib.check_int("max_new_tokens", self.max_new_tokens, min_value=1)
        config_lib.check_int("min_new_tokens", self.min_new_tokens, min_value=0,
                             max_value=self.max_new_tokens)
        config_lib.check(isinstance(self.stop_strings, tuple)
                         and all(isinstance(s, str) and s for s in self.stop_strings),
                         "stop_strings", self.stop_strings, "must be a tuple of non-empty str")


# token ids -> text (e.g. ``tokenizer.decode``): what stop strings are matched against.
Detokenize = Callable[[Sequence[int]], str]


def stop_string_cut(tokens: np.ndarray, sampling: SamplingParams, detokenize: Detokenize, *,
                    checked: int) -> int | None:
    """How many of the generated ``tokens`` to keep when a stop string ends in ``tokens[checked:]``
    (the first ``checked`` are known not to end one), or None when none does.

    Generated token i ends a stop string when ``detokenize(tokens[:i + 1])`` contains one, at the
    first such i. Like stop tokens under ``min_new_tokens``, token i may only stop when
    i ≥ min_new_tokens, and an occurrence lying wholly inside the text of the first
    min_new_tokens tokens does not count. The full text is decoded first, so a response without
    a stop string costs one decode per check.
    """
    tokens = np.asarray(tokens)
    n = len(tokens)
    start = max(checked, sampling.min_new_tokens)
    if not sampling.stop_strings or n <= start:
        return None
    m = sampling.min_new_tokens
    base = len(detokenize(tokens[:m].tolist())) if m else 0

    def ends_stop(count: int) -> bool:
        text = detokenize(tokens[:count].tolist())
        return any(text.find(s, max(0, base - len(s) + 1)) >= 0 for s in sampling.stop_strings)

    if not ends_stop(n):
        return None
    return next(count for count in range(start + 1, n + 1) if ends_stop(count))


def _empty(dtype, *shape) -> np.ndarray:
    return np.zeros((0, *shape), dtype)


@dataclasses.dataclass
class Request:
    """One response being generated: identity, prompt, sampling, and everything produced so far.

    ``seed`` makes sampling independent of batch composition: the engine samples generated
    token i with key ``fold_in(PRNGKey(seed), i)``, whatever slot the request sits in and however
    often it was paused and resumed.
    """

    request_id: str
    prompt_tokens: np.ndarray  # int32 [P]
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    seed: int = 0
    tokens: np.ndarray = dataclasses.field(default_factory=lambda: _empty(np.int32))
    logprobs: np.ndarray = dataclasses.field(default_factory=lambda: _empty(np.float32))
    versions: np.ndarray = dataclasses.field(default_factory=lambda: _empty(np.int32))
    expert_ids: np.ndarray | None = None  # int32 [n, L_moe, K] when recorded
    finish_reason: str | None = None  # None while unfinished
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_generated(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, logprob: float, version: int,
               expert_ids: np.ndarray | None = None) -> None:
        """Records one generated token (host side)."""
        self.tokens = np.append(self.tokens, np.int32(token))
        self.logprobs = np.append(self.logprobs, np.float32(logprob))
        self.versions = np.append(self.versions, np.int32(version))
        if expert_ids is not None:
            row = np.asarray(expert_ids, np.int32)[None]
            self.expert_ids = row if self.expert_ids is None else np.concatenate(
                [self.expert_ids, row])


@dataclasses.dataclass
class StepOutput:
    """What one `Engine.step` call produced."""

    finished: list[Request]  # requests that finished during this step
    num_new_tokens: int  # tokens generated during this step (all requests)
    num_in_flight: int  # requests still in the engine (active slots + pending queue)


class EngineProtocol(Protocol):
    """What a scheduler needs from an engine. `ring_jax.rollout.Engine` implements it; tests use
    a fake with scripted response lengths. An engine may also offer ``pop_stats() -> dict[str,
    float]`` (work done since the last call, as `Engine.pop_stats`); the scheduler then logs a
    rollout's share as ``rollout/engine/<name>``."""

    num_slots: int
    version: int

    def add(self, requests: Sequence[Request]) -> None:
        """Queues requests; a request with tokens already generated is resumed."""

    def step(self, token_budget: int | None = None) -> StepOutput:
        """Generates until ``token_budget`` new tokens are spent (None: until nothing is left).
        One decode step makes at most ``num_slots`` tokens, so a step may overshoot the budget by
        fewer than ``num_slots`` tokens."""

    def drain(self) -> list[Request]:
        """Removes and returns every unfinished request (active or pending) with all it has."""

    def load_weights(self, params: Any, version: int) -> None:
        """Installs new policy weights; later tokens are recorded with ``version``."""
