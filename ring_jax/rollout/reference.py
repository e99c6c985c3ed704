"""The naive generator: no KV cache, the full forward recomputed for every new token.

It is the yardstick the engine is tested against (same sampling code, same per-token keys, so
with float32 numerics the two must agree token for token) and the baseline its speed is
measured against. Sequences live right-padded in one [B, max_len] buffer, so the forward
compiles once; causal attention makes the padding invisible to the real tokens, and the model
excludes nothing else (run it with a dropless MoE so padding cannot take expert capacity).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ring_jax.rollout import sampling
from ring_jax.rollout.types import (FINISH_LENGTH, FINISH_STOP, Detokenize, Request,
                                    stop_string_cut)

# (variables, tokens_BT) -> (logits_BTV, expert_ids_LBTK | None): a full causal forward.
FullForward = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array | None]]


def model_forward(module: Any, record_expert_ids: bool) -> FullForward:
    """A `FullForward` from a ring_jax `Transformer` (its training path: no cache)."""

    def forward(variables, tokens_BT):
        logits_BTV, aux = module.apply(variables, tokens_BT,
                                       return_expert_ids=record_expert_ids)
        return logits_BTV, aux["expert_ids"] if record_expert_ids else None

    return forward


@jax.jit
def _sample_rows(logits_BV, seed_B, index_B, temperature_B, top_k_B, top_p_B, greedy_B,
                 banned_BV):
    key_B = jax.vmap(sampling.token_key)(seed_B, index_B)
    return sampling.sample(logits_BV, key_B, temperature_B=temperature_B, top_k_B=top_k_B,
                           top_p_B=top_p_B, greedy_B=greedy_B, banned_BV=banned_BV)


def generate(forward: FullForward, variables: Any, requests: Sequence[Request], *,
             max_len: int, version: int = 0,
             detokenize: Detokenize | None = None) -> list[Request]:
    """Runs every request to completion, recomputing the whole forward for each token.

    Same semantics as `Engine` (stop tokens, stop strings checked after every token with
    ``detokenize``, min/max new tokens, the max_len limit, resumed requests, raw-logit
    log-probs, ``fold_in(PRNGKey(seed), i)`` keys); returns finished copies in input order.
    """
    if detokenize is None and any(r.sampling.stop_strings for r in requests):
        raise ValueError("requests with stop_strings need a detokenize")
    B = len(requests)
    buffer_BS = np.zeros((B, max_len), np.int32)
    length_B = np.zeros((B,), np.int32)
    for b, r in enumerate(requests):
        seq = np.concatenate([r.prompt_tokens, r.tokens]).astype(np.int32)
        buffer_BS[b, :len(seq)] = seq
        length_B[b] = len(seq)
    jit_forward = jax.jit(forward)
    params = [r.sampling for r in requests]
    seed_B = np.asarray([r.seed for r in requests], np.uint32)
    new = [dict(tokens=[], logprobs=[], expert_ids=[]) for _ in requests]
    finish = [None] * B
    while any(f is None for f in finish):
        logits_BSV, expert_ids_LBSK = jit_forward(variables, buffer_BS)
        last_B = jnp.asarray(length_B - 1)
        logits_BV = jnp.take_along_axis(logits_BSV, last_B[:, None, None], axis=1)[:, 0]
        V = logits_BV.shape[-1]
        index_B = np.asarray([r.num_generated + len(n["tokens"]) for r, n in zip(requests, new)],
                             np.int32)
        banned_BV = np.zeros((B, V), bool)
        for b, p in enumerate(params):
            if index_B[b] < p.min_new_tokens:
                banned_BV[b, list(p.stop_token_ids)] = True
        token_B, logprob_B = jax.device_get(_sample_rows(
            logits_BV, seed_B, index_B,
            np.asarray([p.temperature for p in params], np.float32),
            np.asarray([p.top_k for p in params], np.int32),
            np.asarray([p.top_p for p in params], np.float32),
            np.asarray([p.greedy for p in params], bool), banned_BV))
        expert_ids_LBK = None
        if expert_ids_LBSK is not None:
            expert_ids_LBK = np.asarray(jnp.take_along_axis(
                expert_ids_LBSK, last_B[None, :, None, None], axis=2)[:, :, 0])
        for b, p in enumerate(params):
            if finish[b] is not None:
                continue
            token = int(token_B[b])
            new[b]["tokens"].append(token)
            new[b]["logprobs"].append(float(logprob_B[b]))
            if expert_ids_LBK is not None:
                new[b]["expert_ids"].append(expert_ids_LBK[:, b])
            buffer_BS[b, length_B[b]] = token
            length_B[b] += 1
            if token in p.stop_token_ids and index_B[b] >= p.min_new_tokens:
                finish[b] = FINISH_STOP
            elif p.stop_strings and stop_string_cut(
                    np.concatenate([requests[b].tokens, new[b]["tokens"]]).astype(np.int32), p,
                    detokenize, checked=int(index_B[b])) is not None:
                finish[b] = FINISH_STOP
            elif index_B[b] + 1 >= p.max_new_tokens or length_B[b] >= max_len:
                finish[b] = FINISH_LENGTH
    out = []
    for r, n, f in zip(requests, new, finish):
        expert_ids = r.expert_ids
        if n["expert_ids"]:
            e = np.stack(n["expert_ids"]).astype(np.int32)
            expert_ids = e if expert_ids is None else np.concatenate([expert_ids, e])
        out.append(dataclasses.replace(
            r, tokens=np.concatenate([r.tokens, np.asarray(n["tokens"], np.int32)]),
            logprobs=np.concatenate([r.logprobs, np.asarray(n["logprobs"], np.float32)]),
            versions=np.concatenate([r.versions, np.full(len(n["tokens"]), version, np.int32)]),
            expert_ids=expert_ids, finish_reason=f))
    return out
