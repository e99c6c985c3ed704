"""Mismatch probe: how far the engine's recorded log-probs and experts are from the trainer's.

PAPER §1 (IcePop): the inference engine and the trainer disagree on π(token) at the same
weights, and in MoE models near-tied router scores flip expert choices, more so in deeper
layers and later positions. Given finished rollouts (tokens, recorded inference log-probs and
expert ids), the probe recomputes the trainer's view with one full float32 forward over
prompt + response and reports

  * |Δlogp| = |log π_train − log π_infer| per response token, summarised by position bucket
    (mean, max, count) and overall;
  * per MoE layer, the fraction of response tokens whose *set* of routed experts differs between
    the engine (recorded) and the trainer (recomputed).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ring_jax.rollout import reference
from ring_jax.rollout.types import Request

DEFAULT_BUCKET_EDGES = (0, 16, 64, 256, 1024, 4096)


@dataclasses.dataclass
class MismatchReport:
    bucket_edges: tuple[int, ...]  # response position t falls in [edges[i], edges[i+1])
    abs_dlogp_mean_by_bucket: np.ndarray  # [num_buckets], NaN where a bucket is empty
    abs_dlogp_max_by_bucket: np.ndarray
    tokens_by_bucket: np.ndarray  # int
    abs_dlogp_mean: float
    abs_dlogp_max: float
    expert_flip_frac_by_layer: np.ndarray | None  # [L_moe]; None without recorded expert ids

    def metrics(self) -> dict[str, float]:
        """Flat scalars, named with the project's metric prefixes."""
        out = {"mismatch/abs_dlogp_mean": self.abs_dlogp_mean,
               "mismatch/abs_dlogp_max": self.abs_dlogp_max}
        edges = self.bucket_edges
        for i, mean in enumerate(self.abs_dlogp_mean_by_bucket):
            if self.tokens_by_bucket[i]:
                out[f"mismatch/abs_dlogp_mean_pos{edges[i]}-{edges[i + 1]}"] = float(mean)
        if self.expert_flip_frac_by_layer is not None:
            for layer, frac in enumerate(self.expert_flip_frac_by_layer):
                out[f"moe/expert_flip_frac_layer{layer}"] = float(frac)
            out["moe/expert_flip_frac"] = float(np.mean(self.expert_flip_frac_by_layer))
        return out


def trainer_view(forward: reference.FullForward, variables: Any, requests: Sequence[Request],
                 *, batch_size: int = 8) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Per request: the trainer's log-probs of its response tokens [n] and, if the forward
    returns them, the experts of the steps that predicted them [n, L_moe, K]."""
    jit_forward = jax.jit(forward)
    lengths = [len(r.prompt_tokens) + r.num_generated for r in requests]
    T = 1 << max(4, int(np.ceil(np.log2(max(lengths)))))  # one compile per power of two
    out = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        tokens_BT = np.zeros((batch_size, T), np.int32)
        for b, r in enumerate(chunk):
            seq = np.concatenate([r.prompt_tokens, r.tokens])
            tokens_BT[b, :len(seq)] = seq
        logits_BTV, expert_ids_LBTK = jit_forward(variables, tokens_BT)
        logp_BT = jnp.take_along_axis(jax.nn.log_softmax(logits_BTV.astype(jnp.float32), -1),
                                      jnp.roll(tokens_BT, -1, axis=1)[..., None], -1)[..., 0]
        logp_BT = np.asarray(logp_BT)
        expert_ids_LBTK = None if expert_ids_LBTK is None else np.asarray(expert_ids_LBTK)
        for b, r in enumerate(chunk):
            # Response token t is predicted at position P + t - 1.
            P, n = len(r.prompt_tokens), r.num_generated
            logp = logp_BT[b, P - 1:P - 1 + n]
            experts = None
            if expert_ids_LBTK is not None:
                experts = np.moveaxis(expert_ids_LBTK[:, b, P - 1:P - 1 + n], 1, 0)
            out.append((logp, experts))
    return out


def probe_mismatch(forward: reference.FullForward, variables: Any,
                   requests: Sequence[Request], *,
                   bucket_edges: Sequence[int] = DEFAULT_BUCKET_EDGES,
                   batch_size: int = 8) -> MismatchReport:
    """Compares recorded inference log-probs / experts with a trainer forward (module doc).

    ``forward`` should be the trainer's full-precision path, e.g.
    ``reference.model_forward(Transformer(float32 cfg), record_expert_ids=True)`` with float32
    variables. Expert flips are computed only when every request recorded expert ids.
    """
    requests = [r for r in requests if r.num_generated > 0]
    if not requests:
        raise ValueError("probe_mismatch needs at least one request with generated tokens")
    edges = tuple(int(e) for e in bucket_edges)
    views = trainer_view(forward, variables, requests, batch_size=batch_size)
    dlogp = np.concatenate([np.abs(lp - r.logprobs) for (lp, _), r in zip(views, requests)])
    pos = np.concatenate([np.arange(r.num_generated) for r in requests])
    bucket = np.searchsorted(np.asarray(edges), pos, side="right") - 1
    nb = len(edges) - 1
    count = np.bincount(bucket, minlength=nb)[:nb]
    total = np.bincount(bucket, weights=dlogp, minlength=nb)[:nb]
    maxes = np.full(nb, np.nan)
    for i in range(nb):
        if count[i]:
            maxes[i] = dlogp[bucket == i].max()
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(count > 0, total / np.maximum(count, 1), np.nan)

    flips = None
    if all(r.expert_ids is not None for r in requests) and views[0][1] is not None:
        engine_NLK = np.sort(np.concatenate([r.expert_ids for r in requests]), axis=-1)
        trainer_NLK = np.sort(np.concatenate([e for _, e in views]), axis=-1)
        flips = np.any(engine_NLK != trainer_NLK, axis=-1).mean(axis=0)
    return MismatchReport(bucket_edges=edges, abs_dlogp_mean_by_bucket=means,
                          abs_dlogp_max_by_bucket=maxes, tokens_by_bucket=count,
                          abs_dlogp_mean=float(dlogp.mean()), abs_dlogp_max=float(dlogp.max()),
                          expert_flip_frac_by_layer=flips)
