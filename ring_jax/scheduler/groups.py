"""A GRPO group: one prompt record and its G responses, on their way to a training batch.

A group reaches training only when all G members are finished and scored (PAPER §2, open choice
"finished members wait for their group"); its advantages are computed once, then.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ring_jax.rollout.types import Request, SamplingParams


@dataclasses.dataclass
class Group:
    group_id: int
    record: dict[str, Any]  # the prompt record from the prompt source
    retries: int  # times this prompt was re-queued after a purge
    members: list[Request]  # G requests, sample index = position
    rewards: list[float | None]
    cuts: list[int]  # times each member was drained unfinished (the paper's σ counter)
    advantages: np.ndarray | None = None  # float32 [G], set when the group completes

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def complete(self) -> bool:
        return all(r.finished for r in self.members) and all(
            x is not None for x in self.rewards)

    def oldest_version(self) -> int | None:
        """Oldest policy version among all tokens generated for this group so far."""
        firsts = [int(r.versions.min()) for r in self.members if r.num_generated]
        return min(firsts) if firsts else None

    def to_tree(self) -> dict[str, Any]:
        return {
            "group_id": self.group_id, "record": self.record, "retries": self.retries,
            "members": [request_to_tree(r) for r in self.members],
            "rewards": list(self.rewards), "cuts": list(self.cuts),
            "advantages": self.advantages,
        }

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> Group:
        return cls(group_id=tree["group_id"], record=tree["record"], retries=tree["retries"],
                   members=[request_from_tree(m) for m in tree["members"]],
                   rewards=list(tree["rewards"]), cuts=list(tree["cuts"]),
                   advantages=tree["advantages"])


def request_to_tree(request: Request) -> dict[str, Any]:
    return {
        "request_id": request.request_id,
        "prompt_tokens": np.asarray(request.prompt_tokens, np.int32),
        "sampling": dataclasses.asdict(request.sampling),
        "seed": int(request.seed),
        "tokens": np.asarray(request.tokens, np.int32),
        "logprobs": np.asarray(request.logprobs, np.float32),
        "versions": np.asarray(request.versions, np.int32),
        "expert_ids": (None if request.expert_ids is None
                       else np.asarray(request.expert_ids, np.int32)),
        "finish_reason": request.finish_reason,
        "metadata": dict(request.metadata),
    }


def request_from_tree(tree: dict[str, Any]) -> Request:
    sampling = dict(tree["sampling"])
    sampling["stop_token_ids"] = tuple(sampling["stop_token_ids"])
    return Request(
        request_id=tree["request_id"], prompt_tokens=tree["prompt_tokens"],
        sampling=SamplingParams(**sampling), seed=tree["seed"], tokens=tree["tokens"],
        logprobs=tree["logprobs"], versions=tree["versions"], expert_ids=tree["expert_ids"],
        finish_reason=tree["finish_reason"], metadata=dict(tree["metadata"]))
