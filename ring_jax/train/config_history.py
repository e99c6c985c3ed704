"""What may change when a run resumes, and the history of its config in the workdir.

A run directory's checkpoints mean something only under the config that wrote them: the model
architecture fixes the parameter tree, the optimizer its state, the task/seed/group size the
data stream and the scheduler's buffer. Resuming with another value of such a field either
crashes deep inside orbax or, worse, silently trains a mix of two runs. Other fields only steer
what happens next (how long to run, how often to evaluate or save, how many host threads score
rewards) and changing them on resume is normal.

`SAFE_FIELDS` is the one list of the second kind; every other field is a *state* field. A
resume (the workdir holds an RL or SFT checkpoint) diffs the new config against the recorded
`config.json`:

  * any changed state field -> `ConfigError` listing every changed field with old and new
    values; nothing in the workdir is touched;
  * only safe fields changed -> each change is logged; the recorded config moves to
    `config.<step>.json` (the RL step the old config reached; `.<step>.<k>.json` if that
    exists) and the new one becomes `config.json`;
  * a field present on one side only (the code gained or lost a field) is logged, not refused.

A workdir without a checkpoint just gets the new `config.json`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping

from ring_jax.config import ConfigError
from ring_jax.train import metrics as metrics_lib

log = logging.getLogger(__name__)

# Dotted field names, or prefixes ending in "." covering a whole section. A field here changes
# what the run does next, never what its saved state means.
SAFE_FIELDS = (
    "rl.num_steps",                   # run longer (or stop earlier)
    "eval.",                          # held-out evaluation: cadence, size, samples (metrics only)
    "checkpoint.",                    # save cadence, retention, async writes, NaN patience
    "mesh.",                          # checkpoints restore onto any mesh
    "sft.log_every",                  # console cadence
    "scheduler.num_reward_workers",   # host threads scoring rewards
    "reward.score_workers",
    "engine.num_slots",               # engine throughput knobs: batch slots, decode chunk,
    "engine.decode_chunk",            # prefill bucket (sampled tokens may differ numerically
    "engine.min_prefill_len",         # from an uninterrupted run, the state's meaning does not)
    "engine.refill_min_rows",
    "engine.min_prefill_rows",
    "engine.warmup_buckets",
    "model.remat_policy",             # memory levers: same parameters, same update
    "model.attention_chunk",          # (ring_jax.plan measures them)
    "model.moe_token_chunk",
    "model.scan_layers",
    "rl.num_microbatches",
    "rl.donate_state",
    "scheduler.prefetch_batches",     # async read-ahead: timing only (prefetched batches are
)                                     # saved back as the ready groups they were built from)

_MISSING = "<absent>"


@dataclasses.dataclass(frozen=True)
class Change:
    field: str   # dotted name
    old: Any     # _MISSING when the field was added
    new: Any     # _MISSING when the field was removed

    def __str__(self) -> str:
        return f"{self.field}: {self.old!r} -> {self.new!r}"


def is_safe(field: str) -> bool:
    """Whether `field` (dotted) may change on resume (`SAFE_FIELDS`)."""
    return any(field == safe or (safe.endswith(".") and field.startswith(safe))
               for safe in SAFE_FIELDS)


def diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[Change]:
    """Every leaf field whose value differs, in sorted dotted order (sections recurse)."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changes += diff(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(Change(f"{prefix}{key}", a, b))
    return changes


def saved_steps(checkpoint_dir: str) -> list[int]:
    """Committed step directories under `checkpoint_dir` (names that are integers); a plain
    listing, no orbax: cheap enough to run before anything else."""
    if not os.path.isdir(checkpoint_dir):
        return []
    return sorted(int(n) for n in os.listdir(checkpoint_dir)
                  if n.isdigit() and os.path.isdir(os.path.join(checkpoint_dir, n)))


def check_resume(workdir: str, config: Any) -> list[Change]:
    """The changes of `config` against the workdir's recorded config.json (if any): raises
    `ConfigError` when a state field changed while the workdir holds a checkpoint; returns the
    changes (all allowed) otherwise. Writes nothing."""
    path = os.path.join(workdir, metrics_lib.CONFIG_FILE)
    if not _has_checkpoint(workdir) or not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the recorded config {path} of the run to resume: {e}")
    changes = diff(recorded, metrics_lib.config_as_json(config))
    refused = [c for c in changes if not is_safe(c.field)
               and _MISSING not in (c.old, c.new)]
    if refused:
        raise ConfigError(
            f"cannot resume {workdir} with this config: these fields change what its "
            f"checkpoints mean (recorded in {path}): " + "; ".join(map(str, refused))
            + ". Restore them, or use a new --workdir.")
    return changes


def record(workdir: str, config: Any, *, write: bool = True) -> list[Change]:
    """Validates `config` against the run in `workdir` (`check_resume`), then (if `write`: the
    main process) keeps the old config as `config.<step>.json` and writes the new config.json.
    Returns the allowed changes, each logged once."""
    changes = check_resume(workdir, config)
    for change in changes:
        log.warning("resuming %s with a changed config: %s", workdir, change)
    if not write:
        return changes
    path = os.path.join(workdir, metrics_lib.CONFIG_FILE)
    if changes:
        steps = saved_steps(os.path.join(workdir, "checkpoints"))
        stem = os.path.join(workdir, f"config.{steps[-1] if steps else 0}")
        archive, k = f"{stem}.json", 1
        while os.path.exists(archive):
            archive, k = f"{stem}.{k}.json", k + 1
        os.replace(path, archive)
    if changes or not os.path.exists(path) or not _has_checkpoint(workdir):
        metrics_lib.write_config_json(workdir, config)
    return changes


def _has_checkpoint(workdir: str) -> bool:
    return bool(saved_steps(os.path.join(workdir, "checkpoints"))
                or saved_steps(os.path.join(workdir, "sft", "checkpoints")))
