"""Held-out evaluation through the rollout engine: pass@1 (greedy) and avg@k (sampled).

The problems (`eval_records`) are a fixed set: the first ``num_prompts`` distinct problems of the
task's held-out split (`Task.held_out`; disjoint from every SFT/RL draw by construction, see
`ring_jax.data.tasks.base.in_eval_split`), drawn with a constant seed, so every run seed and every
arm of a study evaluates the same problems and arms can be compared pairwise. Greedy pass@1 can
run on its own float32 engine (`EvalConfig.greedy_engine`), so it is a function of the policy
alone, not of the run's inference noise. Scoring uses the run's reward function; a response
counts as correct when the scorer's ``correct`` detail is true.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from ring_jax.config import ConfigError
from ring_jax.data import pipeline
from ring_jax.rollout.precision import InferencePrecision
from ring_jax.rollout.types import Request, SamplingParams

FP32_PRECISION = InferencePrecision(dtype="float32")  # the greedy engine: no mismatch knobs
EVAL_SET_SEED = 0  # the held-out problem set's draw; deliberately not the run seed
EVAL_DRAW_SPACE = 1 << 20  # indices a generated task's eval set is drawn from
MAX_DRAWS_PER_PROBLEM = 64  # draws per wanted problem before the split counts as too small


def eval_records(task, tokenizer, num_prompts: int, thinking: bool = True
                 ) -> list[dict[str, Any]]:
    """The fixed evaluation set: the first ``num_prompts`` distinct problems (by prompt) of
    ``task.held_out()`` drawn with `EVAL_SET_SEED`, as prompt records numbered 0..n-1.

    A task with a finite held-out split smaller than ``num_prompts`` (a file task's held-out
    rows) is evaluated on all of it; a generated task whose split yields fewer distinct problems
    raises `ConfigError` naming ``eval.num_prompts``.
    """
    held_out = task.held_out()
    finite = getattr(held_out, "num_examples", None)
    # One draw order for every size (a smaller set is a prefix of a larger one).
    ds = pipeline.prompt_dataset(held_out, tokenizer, seed=EVAL_SET_SEED,
                                 num_prompts=finite or EVAL_DRAW_SPACE, thinking=thinking)
    num_draws = min(len(ds), MAX_DRAWS_PER_PROBLEM * num_prompts)
    records, seen = [], set()
    for i in range(num_draws):
        record = ds[i]
        if record["prompt_text"] in seen:
            continue
        seen.add(record["prompt_text"])
        records.append({**record, "prompt_id": len(records), "group_id": len(records)})
        if len(records) == num_prompts:
            return records
    if finite is None or num_draws < len(ds):
        raise ConfigError(
            f"eval.num_prompts={num_prompts} is invalid: the held-out split of {task.name} gave "
            f"{len(records)} distinct problems in {num_draws} draws; lower it or raise "
            "task.kwargs.eval_fraction")
    return records


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
             sampling: SamplingParams, num_samples: int, seed: int = 0,
             greedy_engine=None) -> dict[str, float]:
    """``eval/pass@1`` (greedy, on ``greedy_engine`` when given, else ``engine``),
    ``eval/avg@k`` and, for k > 1, ``eval/pass@k`` (k sampled responses per problem at
    ``sampling`` on ``engine``, request seeds from ``seed``), mean reward, response length and the number of
    problems. The engines must be idle."""
    out: dict[str, float] = {"eval/num_problems": float(len(records))}
    greedy = dataclasses.replace(sampling, greedy=True)
    for tag, params, k in (("greedy", greedy, 1), ("sampled", sampling, num_samples)):
        runner = greedy_engine if tag == "greedy" and greedy_engine is not None else engine
        done = _generate(runner, records, params, k, seed, tag)
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
            if k > 1:  # with one sample, "pass@1" would overwrite the greedy pass@1
                out[f"eval/pass@{k}"] = float(correct_PK.max(axis=1).mean())
            out["eval/sampled_response_tokens"] = float(np.mean(lengths))
    return out
