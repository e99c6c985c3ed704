"""Scheduler state as a flat dict of numpy arrays, so any checkpointer (orbax, np.savez) stores it.

The nested state (lists, dicts, strings, numbers, numpy arrays) is split into a JSON skeleton,
stored as a uint8 array under ``"meta_json"``, and one flat array per dtype (``"data_int32"``,
...) holding every numpy array's values back to back; the skeleton records each array's dtype,
offset and shape. A few large arrays instead of thousands of per-request ones keep checkpoints
fast whatever the buffer size.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from ring_jax.rollout.types import Request, SamplingParams

_ARRAY = "__ndarray__"
_TUPLE = "__tuple__"


def encode(tree: Any) -> dict[str, np.ndarray]:
    """Nested JSON-able structure with numpy arrays → flat dict of numpy arrays."""
    chunks: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}

    def walk(x):
        if isinstance(x, np.ndarray):
            if x.dtype.kind not in "biuf":
                raise TypeError(f"scheduler state: cannot store array of dtype {x.dtype}")
            name = np.dtype(x.dtype).name
            offset = sizes.get(name, 0)
            chunks.setdefault(name, []).append(x.reshape(-1))
            sizes[name] = offset + x.size
            return {_ARRAY: [name, offset, list(x.shape)]}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, dict):
            for k in x:
                if not isinstance(k, str):
                    raise TypeError(f"scheduler state: dict keys must be str, got {k!r}")
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, tuple):
            return {_TUPLE: [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"scheduler state: cannot store a {type(x).__name__} ({x!r:.80})")

    skeleton = walk(tree)
    out = {"meta_json": np.frombuffer(json.dumps(skeleton).encode(), np.uint8).copy()}
    for name, parts in chunks.items():
        out[f"data_{name}"] = np.concatenate(parts)
    return out


def decode(flat: dict[str, Any]) -> Any:
    """Inverse of `encode` (accepts arrays restored by any checkpointer)."""
    skeleton = json.loads(np.asarray(flat["meta_json"], np.uint8).tobytes().decode())
    data = {k[len("data_"):]: np.asarray(v) for k, v in flat.items() if k.startswith("data_")}

    def walk(x):
        if isinstance(x, dict):
            if _ARRAY in x:
                name, offset, shape = x[_ARRAY]
                size = int(np.prod(shape, dtype=np.int64))
                return data[name][offset:offset + size].astype(name).reshape(shape).copy()
            if _TUPLE in x:
                return tuple(walk(v) for v in x[_TUPLE])
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(skeleton)


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
