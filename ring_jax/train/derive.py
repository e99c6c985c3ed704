"""One derivation of the run's config: every derived field computed in one place from the user's.

`derive(cfg)` takes a validated `ExperimentConfig` and returns the one the run uses (and records
in ``config.json``):

* **Seed streams.** The run seed ``seed`` fans out to one named stream per consumer, so "another
  seed" changes every source of randomness and two consumers never share one:

      init      model initialisation (SFT's and RL's fresh init)
      sft       SFT data order and problems (`SFTConfig.seed`)
      prompts   the RL prompt stream: problem draws and their order (`pipeline.prompt_dataset`)
      sampling  the engine's per-request sampling keys (`SchedulerConfig.seed`)
      eval      the sampled evaluation responses (avg@k, pass@k); the evaluation *problems* are
                a fixed set that no seed touches (`EvalConfig`, `Task.held_out`)

  Stream ``name`` gets ``stream_seed(seed, name)``, a stable hash of ``"<seed>/<name>"`` (the
  same on every machine and Python version). **Rule for pinning one stream:** a non-negative
  ``seeds.<name>`` is used as is, whatever ``seed`` is (e.g. ``--config.seeds.sft=0`` gives every
  run the same SFT data); ``-1`` (the default) derives it. ``scheduler.seed`` and ``sft.seed``
  are outputs of this derivation: setting them directly is an error naming ``seeds.sampling`` /
  ``seeds.sft``. (The reward workers hold no random state, so they need no stream.)
* **Stop tokens:** the tokenizer's EOS is appended to ``scheduler.sampling.stop_token_ids``.
* **A trainer that does not drop tokens in a mismatch study.** A run whose engine widens the
  mismatch on purpose (`InferencePrecision.has_mismatch_knob`) measures or corrects that
  mismatch, so the trainer's MoE dispatch must be dropless (`moe.is_dropless`: ``ragged``,
  ``reference``, or ``capacity`` with ``capacity_factor >= E/K``); otherwise tokens the trainer
  drops and the engine keeps are a second, silent source of mismatch. Else a `ConfigError`,
  unless ``rl.allow_trainer_drops=True``. (A correction alone, as in the quickstart's IcePop on
  the plain bf16 engine, is not a mismatch study; its dropped share is in the metrics,
  ``moe/dropped_frac``.)
* **Routing shape:** ``scheduler.expert_ids_shape`` = (MoE layers, K) when the engine records
  routed experts (router replay), else None.

`derive` is idempotent (deriving a derived config changes nothing), so a recorded config
reproduces the run.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from ring_jax import config as config_lib
from ring_jax.config import ConfigError
from ring_jax.model import moe

STREAMS = ("init", "sft", "prompts", "sampling", "eval")
DERIVED = -1  # a ``seeds.<name>`` at this value is derived from the run seed


@dataclasses.dataclass(frozen=True)
class SeedStreams:
    """Per-consumer seeds; -1 derives the stream from the run seed (see module docstring)."""

    init: int = DERIVED
    sft: int = DERIVED
    prompts: int = DERIVED
    sampling: int = DERIVED
    eval: int = DERIVED

    def __post_init__(self):
        for name in STREAMS:
            # < 2**31: room for the per-request offsets the engine's uint32 seeds add.
            config_lib.check_int(name, getattr(self, name), min_value=DERIVED,
                                 max_value=2**31 - 1)

    def resolve(self, run_seed: int) -> "SeedStreams":
        """Every stream as a concrete seed: the pinned ones as set, the others derived."""
        return SeedStreams(**{name: stream_seed(run_seed, name) if getattr(self, name) == DERIVED
                              else getattr(self, name) for name in STREAMS})


def stream_seed(run_seed: int, name: str) -> int:
    """The seed of stream ``name`` for ``run_seed``: the first 31 bits of SHA-256 of
    ``"<run_seed>/<name>"`` (stable across processes, unlike Python's ``hash``; fits every
    consumer, including `jax.random.key` and the engine's uint32 request seeds)."""
    digest = hashlib.sha256(f"{run_seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _check_not_set_directly(field: str, value: int, derived: int, stream: str) -> None:
    """``scheduler.seed`` / ``sft.seed`` are outputs: 0 (their library default) or the value a
    previous derivation wrote; anything else would be silently overwritten."""
    if value not in (0, derived):
        raise ConfigError(f"{field}={value!r} is invalid: derived from seed; pin the stream with "
                          f"seeds.{stream}={value} instead")


def _check_trainer_dropless(cfg: Any) -> None:
    m = cfg.model
    if not cfg.precision.has_mismatch_knob or cfg.rl.allow_trainer_drops or moe.is_dropless(m):
        return
    knobs = [k for k in ("fp8_expert_weights", "router_noise_std", "expert_scale_error_std")
             if getattr(cfg.precision, k)]
    raise ConfigError(
        f"model.capacity_factor={m.capacity_factor!r} is invalid: a mismatch study "
        f"(precision.{knobs[0]} set) needs a dropless trainer: model.capacity_factor >= "
        f"E/K={m.num_experts / m.num_experts_per_tok:g}, model.moe_impl='ragged' or "
        "'reference', or rl.allow_trainer_drops=True")


def derive(cfg: Any, eos_id: int | None = None) -> Any:
    """The run's `ExperimentConfig` with every derived field filled in (module docstring).

    ``eos_id``: the tokenizer's end-of-sequence id (default: looked up from ``task.tokenizer``).
    """
    _check_trainer_dropless(cfg)
    seeds = cfg.seeds.resolve(cfg.seed)
    _check_not_set_directly("sft.seed", cfg.sft.seed, seeds.sft, "sft")
    _check_not_set_directly("scheduler.seed", cfg.scheduler.seed, seeds.sampling, "sampling")
    if eos_id is None:
        from ring_jax.data.tokenizer import get_tokenizer
        eos_id = get_tokenizer(cfg.task.tokenizer).eos_id
    sampling = cfg.scheduler.sampling
    stops = tuple(dict.fromkeys((*sampling.stop_token_ids, eos_id)))
    expert_ids_shape = None
    if cfg.engine.record_expert_ids and cfg.model.is_moe:
        expert_ids_shape = (cfg.model.num_moe_layers, cfg.model.num_experts_per_tok)
    scheduler = dataclasses.replace(
        cfg.scheduler, seed=seeds.sampling, expert_ids_shape=expert_ids_shape,
        sampling=dataclasses.replace(sampling, stop_token_ids=stops))
    return dataclasses.replace(cfg, seeds=seeds, scheduler=scheduler,
                               sft=dataclasses.replace(cfg.sft, seed=seeds.sft))
