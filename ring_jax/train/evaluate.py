"""Held-out evaluation through the rollout engine: pass@1 (greedy) and avg@k (sampled).

The problems come from the task's generator with a seed the training stream never uses
(`EvalConfig.seed_offset`), so they form a held-out split. Scoring uses the run's reward
function; a response counts as correct when the scorer's ``correct`` detail is true.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from ring_jax.rollout.types import Request, SamplingParams


def _generate(engine, records: Sequence[dict[str, Any]], sampling: SamplingParams,
              num_samples: int, seed: int, tag: str) -> list[Request]:
    requests = [Request(request_id=f"eval/{tag}/{r['prompt_id']}/{j}",
                        prompt_tokens=np.asarray(r["prompt_tokens"], np.int32),
                        sampling=sampling, seed=seed + 7919 * int(r["prompt_id"]) + j,
                        metadata={"record": r})
                for r in records for j in range(num_samples)]
    engine.add(requests)
    finished = list(engine.step(None).finished)
    if len(finished) != len(requests):
        raise RuntimeError(f"eval: {len(finished)} of {len(requests)} requests finished")
    return sorted(finished, key=lambda q: q.request_id)


def evaluate(engine, records: Sequence[dict[str, Any]],
             reward_fn: Callable[[Any, Sequence[int], str | None], tuple[float, dict]],
             sampling: SamplingParams, num_samples: int, seed: int = 0) -> dict[str, float]:
    """``eval/pass@1`` (greedy), ``eval/avg@k`` and ``eval/pass@k`` (k sampled responses per
    problem at ``sampling``), mean reward and response length. The engine must be idle."""
    out: dict[str, float] = {}
    greedy = dataclasses.replace(sampling, greedy=True)
    for tag, params, k in (("greedy", greedy, 1), ("sampled", sampling, num_samples)):
        done = _generate(engine, records, params, k, seed, tag)
        correct, rewards, lengths = [], [], []
        for q in done:
            reward, info = reward_fn(q.metadata["record"], q.tokens, q.finish_reason)
            correct.append(bool(info.get("correct", False)))
            rewards.append(reward)
            lengths.append(q.num_generated)
        correct_PK = np.asarray(correct, np.float32).reshape(len(records), k)
        if tag == "greedy":
            out["eval/pass@1"] = float(correct_PK.mean())
            out["eval/greedy_reward"] = float(np.mean(rewards))
            out["eval/greedy_response_tokens"] = float(np.mean(lengths))
        else:
            out[f"eval/avg@{k}"] = float(correct_PK.mean())
            out[f"eval/pass@{k}"] = float(correct_PK.max(axis=1).mean())
            out["eval/sampled_response_tokens"] = float(np.mean(lengths))
    return out
