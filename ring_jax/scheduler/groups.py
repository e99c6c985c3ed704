"""A GRPO group: one prompt record and its G responses, on their way to a training batch.

A group reaches training only when all G members are finished and scored (PAPER §2, open choice
"finished members wait for their group"); its advantages are computed once, then.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ring_jax.rollout.types import Request
from ring_jax.scheduler import state as state_lib


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
            "members": [state_lib.request_to_tree(r) for r in self.members],
            "rewards": list(self.rewards), "cuts": list(self.cuts),
            "advantages": self.advantages,
        }

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> Group:
        return cls(group_id=tree["group_id"], record=tree["record"], retries=tree["retries"],
                   members=[state_lib.request_from_tree(m) for m in tree["members"]],
                   rewards=list(tree["rewards"]), cuts=list(tree["cuts"]),
                   advantages=tree["advantages"])
