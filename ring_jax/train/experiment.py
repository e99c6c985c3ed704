"""`ExperimentConfig`: the whole run as frozen, validated dataclasses (ConfigDicts stop here).

`experiments/*.py` return an `ml_collections.ConfigDict`; `from_config_dict` turns it into this
tree before anything compiles. Every section maps to the dataclass its module owns, so a field
keeps one definition (and one validation) across the library:

    model       ModelConfig (``preset`` names a starting point in `ring_jax.model.presets`,
                the other keys override its fields)
    task        TaskConfig: registered task name + its keyword arguments
    seeds       SeedStreams: per-consumer seeds, derived from ``seed`` unless pinned
                (`ring_jax.train.derive`: `derive(cfg)` fills every derived field)
    eval        EvalConfig: held-out pass@1 (greedy) and avg@k (sampled)
    sft         SFTConfig (``sft.num_steps = 0`` skips the SFT warm start); sft_optim
    rl          RLConfig: steps, minibatches, advantage (AdvantageConfig), router bias/replay,
                loss (LossConfig), optim (OptimConfig)
    scheduler   SchedulerConfig (sampling: SamplingParams)
    engine      EngineConfig;  precision  InferencePrecision (the engine's numerics);
                engine_moe_impl: the engine's MoE dispatch ("ragged" or "dropless_capacity":
                dropless, batch-independent)
    reward      RewardConfig;  checkpoint CheckpointConfig;  mesh  MeshConfig (the training
                mesh; mesh.engine: EngineMeshConfig, where the rollout engine runs)

An unknown key, a wrong type or an out-of-range value raises `ConfigError` naming the dotted
field (``rl.loss.alpha=-1.0 is invalid: must be >= 0.0``).
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Mapping

from ring_jax import config as config_lib
from ring_jax.config import ConfigError
from ring_jax.data.rewards import RewardConfig
from ring_jax.model import presets
from ring_jax.model.config import MOE_IMPLS, ModelConfig
from ring_jax.rl.advantages import AdvantageConfig
from ring_jax.rl.losses import LossConfig
from ring_jax.rollout.engine import EngineConfig
from ring_jax.rollout.precision import InferencePrecision
from ring_jax.train.multihost import EngineMeshConfig, fill_remaining_axis
from ring_jax.scheduler.config import SchedulerConfig
from ring_jax.train import evaluate
from ring_jax.train import init_from as init_from_lib
from ring_jax.train.checkpoint import CheckpointConfig
from ring_jax.train.derive import SeedStreams, derive  # noqa: F401  (experiment.derive)
from ring_jax.train.optim import OptimConfig
from ring_jax.train.sft import SFTConfig


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """A registered task (`ring_jax.data.tasks.names()`) and its keyword arguments."""

    name: str = "addition"
    kwargs: tuple[tuple[str, Any], ...] = ()
    num_prompts: int = 100_000  # distinct training problems (indices) per epoch
    tokenizer: str = "byte"
    thinking: bool = True  # chat template with an opened thinking section

    def __post_init__(self):
        from ring_jax.data import tasks  # the registry, imported lazily (it loads task modules)
        config_lib.check(tasks.is_known(self.name), "name", self.name,
                         f"must be one of {tasks.names()} or gym/<reasoning-gym dataset>")
        config_lib.check_int("num_prompts", self.num_prompts, min_value=1)
        # Build the task once so its own checks (sizes, file paths, splits) run now, before
        # anything compiles; an unknown keyword is named with the task's fields.
        try:
            tasks.get(self.name, **dict(self.kwargs))
        except TypeError as e:  # an unknown keyword
            config_lib.fail("kwargs", dict(self.kwargs), f"not accepted by task {self.name!r}: {e}")


GREEDY_ENGINES = ("float32", "engine")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation on a fixed problem set (`ring_jax.train.evaluate.eval_records`): the
    task's held-out split (`Task.held_out`, disjoint from every training draw by construction),
    the first ``num_prompts`` distinct problems of it, the same for every run seed and arm, so
    arms pair. ``greedy_engine``: pass@1 is decoded by a float32 engine without mismatch knobs
    ("float32": a function of the policy alone) or by the run's engine ("engine"); sampled
    metrics (avg@k, pass@k) always use the run's engine and the ``seeds.eval`` stream."""

    every: int = 10  # RL steps between evaluations (0: only at the end)
    num_prompts: int = 256
    num_samples: int = 4  # k of avg@k (sampled at the training temperature)
    greedy_engine: str = "float32"

    def __post_init__(self):
        config_lib.check_int("every", self.every, min_value=0)
        config_lib.check_int("num_prompts", self.num_prompts, min_value=1)
        config_lib.check_int("num_samples", self.num_samples, min_value=1)
        config_lib.check_one_of("greedy_engine", self.greedy_engine, GREEDY_ENGINES)


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """The RL stage. One step = one scheduler batch: recompute log π_train(θ_old) on it, then
    ``num_minibatches`` optimizer updates on its row slices (PAPER §1 objective)."""

    num_steps: int = 100
    num_minibatches: int = 1
    num_microbatches: int = 1  # gradient slices per minibatch (memory only; same update)
    advantage: AdvantageConfig = dataclasses.field(default_factory=AdvantageConfig)
    router_bias_rate: float = 1e-3  # u of the aux-loss-free bias update (PAPER §4); 0: frozen
    router_replay: bool = False  # R3: train with the experts the engine chose
    # A run whose engine widens the mismatch on purpose (precision.fp8_expert_weights,
    # router_noise_std, expert_scale_error_std) must train with a dropless MoE dispatch, or the
    # trainer's capacity drops add a mismatch of their own (`derive`); True allows it.
    allow_trainer_drops: bool = False
    logprob_chunk: int = 128  # tokens per chunk of the log-prob / entropy computation
    # θ_old = θ with one update per batch: take log π_train(θ_old) from the update's own
    # forward (stop_gradient) instead of recomputing it; exact, one forward fewer; needs
    # num_minibatches = num_microbatches = 1 (`rl_step` docstring).
    logp_old_from_update: bool = False
    # Donate the train state to the jitted step (its output reuses the input's buffers: one
    # state's memory less per chip); the engine then gets its own copy of any array it would
    # share with the state (`train.donation`).
    donate_state: bool = False
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)

    def __post_init__(self):
        config_lib.check_int("num_steps", self.num_steps, min_value=0)
        config_lib.check_int("num_minibatches", self.num_minibatches, min_value=1)
        config_lib.check_int("num_microbatches", self.num_microbatches, min_value=1)
        config_lib.check_float("router_bias_rate", self.router_bias_rate, min_value=0.0)
        config_lib.check_int("logprob_chunk", self.logprob_chunk, min_value=1)
        config_lib.check(isinstance(self.allow_trainer_drops, bool), "allow_trainer_drops",
                         self.allow_trainer_drops, "must be a bool")
        config_lib.check(isinstance(self.logp_old_from_update, bool), "logp_old_from_update",
                         self.logp_old_from_update, "must be a bool")
        config_lib.check(isinstance(self.donate_state, bool), "donate_state",
                         self.donate_state, "must be a bool")
        config_lib.check(not self.logp_old_from_update
                         or (self.num_minibatches, self.num_microbatches) == (1, 1),
                         "logp_old_from_update", self.logp_old_from_update,
                         f"True needs rl.num_minibatches=1 and rl.num_microbatches=1 (θ_old = θ "
                         f"only for a single update), got {self.num_minibatches} and "
                         f"{self.num_microbatches}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes over (data, fsdp, expert, tensor); -1 on one axis takes the rest.
    ``allow_split_physical_axes``: on TPU, accept axes that cut a physical torus axis
    (`ring_jax.sharding.make_mesh`). ``engine``: where the rollout engine runs
    (`multihost.EngineMeshConfig`); a disaggregated engine's devices are not the trainer's."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    allow_split_physical_axes: bool = False
    engine: EngineMeshConfig = dataclasses.field(default_factory=EngineMeshConfig)

    def _sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in ("data", "fsdp", "expert", "tensor")}

    def __post_init__(self):
        sizes = self._sizes()
        for name, size in sizes.items():
            config_lib.check(size == -1 or (isinstance(size, int) and size >= 1), name, size,
                             "must be a positive int or -1 (the remaining devices)")
        config_lib.check(list(sizes.values()).count(-1) <= 1, "mesh", sizes,
                         "at most one axis may be -1")
        config_lib.check(isinstance(self.allow_split_physical_axes, bool),
                         "allow_split_physical_axes", self.allow_split_physical_axes,
                         "must be True or False")

    def resolve(self, num_devices: int) -> dict[str, int]:
        """The training mesh's sizes over ``num_devices`` (less a disaggregated engine's)."""
        if self.engine.placement == "disaggregated":
            config_lib.check(self.engine.num_devices < num_devices, "mesh.engine.num_devices",
                             self.engine.num_devices,
                             f"must leave the trainer some of the {num_devices} devices")
            num_devices -= self.engine.num_devices
        return fill_remaining_axis(self._sizes(), num_devices, "mesh.", f"{num_devices} devices")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    seed: int = 0
    seeds: SeedStreams = dataclasses.field(default_factory=SeedStreams)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    sft_optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    precision: InferencePrecision = dataclasses.field(default_factory=InferencePrecision)
    engine_moe_impl: str = "ragged"
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    init_from: str = ""  # "" (fresh init), an SFT/RL workdir, or a local HF checkpoint dir

    def __post_init__(self):
        config_lib.check_int("seed", self.seed, min_value=0)
        config_lib.check_one_of("engine_moe_impl", self.engine_moe_impl, MOE_IMPLS)
        s, e = self.scheduler, self.engine
        config_lib.check(s.max_seq_len <= e.max_len, "scheduler.max_seq_len", s.max_seq_len,
                         f"must be <= engine.max_len={e.max_len} (a row holds what the engine "
                         "generated)")
        config_lib.check(s.max_seq_len <= self.model.max_position_embeddings,
                         "scheduler.max_seq_len", s.max_seq_len,
                         f"must be <= model.max_position_embeddings="
                         f"{self.model.max_position_embeddings}")
        config_lib.check(s.batch_size % self.rl.num_minibatches == 0, "rl.num_minibatches",
                         self.rl.num_minibatches,
                         f"must divide scheduler.batch_size={s.batch_size}")
        minibatch = s.batch_size // self.rl.num_minibatches
        config_lib.check(minibatch % self.rl.num_microbatches == 0, "rl.num_microbatches",
                         self.rl.num_microbatches,
                         f"must divide the minibatch (scheduler.batch_size / rl.num_minibatches "
                         f"= {minibatch} rows)")
        config_lib.check(not self.rl.router_replay or self.engine.record_expert_ids,
                         "rl.router_replay", self.rl.router_replay,
                         "needs engine.record_expert_ids=True (the engine records the routing)")
        config_lib.check(not self.rl.router_replay or self.model.is_moe, "rl.router_replay",
                         self.rl.router_replay, "needs a MoE model (model.num_experts > 0)")
        # Every estimator in rl/advantages.py is group-relative and zeroes groups with fewer
        # than 2 members: with G = 1 every advantage is 0 and RL silently does nothing.
        config_lib.check(self.rl.num_steps == 0 or s.group_size >= 2, "scheduler.group_size",
                         s.group_size, f"must be >= 2 when rl.num_steps > 0: the "
                         f"rl.advantage.estimator={self.rl.advantage.estimator!r} advantage of "
                         "a group of one response is 0, so RL would not learn")
        if self.init_from:  # the path and its kind, before anything compiles (init_from.py)
            init_from_lib.validate(self.init_from, self.model)
        self._check_task_lengths()

    def _check_task_lengths(self) -> None:
        """Prompts that cannot fit scheduler.max_seq_len, and SFT examples sft.seq_len would
        cut to nothing, fail now rather than after the SFT stage (`data/length_check.py`)."""
        seeds = self.seeds.resolve(self.seed)
        # The streams the run draws problems with: RL prompts, and the fixed evaluation set's
        # draw of the held-out split.
        _check_task_lengths(self.task, (seeds.prompts, evaluate.EVAL_SET_SEED),
                            self.scheduler.max_seq_len,
                            self.sft.seq_len if self.sft.num_steps else 0, seeds.sft,
                            self.sft.thinking)


@functools.lru_cache(maxsize=64)
def _check_task_lengths(task: TaskConfig, seeds: tuple[int, int], max_seq_len: int,
                        sft_seq_len: int, sft_seed: int, sft_thinking: bool) -> None:
    """`length_check.check_task_lengths` once per distinct input: a config is rebuilt several
    times per launch (`derive`, `dataclasses.replace`), the scan tokenizes hundreds of prompts."""
    from ring_jax.data import length_check, tasks
    from ring_jax.data.tokenizer import get_tokenizer
    length_check.check_task_lengths(
        tasks.get(task.name, **dict(task.kwargs)), get_tokenizer(task.tokenizer),
        seeds=seeds, thinking=task.thinking, max_seq_len=max_seq_len, sft_seq_len=sft_seq_len,
        sft_seed=sft_seed, sft_thinking=sft_thinking)


# ------------------------------------------------------------------------------------------------
# ConfigDict -> dataclasses
# ------------------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass type inside ``hint`` (``X`` or ``X | None``), if any."""
    if dataclasses.is_dataclass(hint):
        return hint
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _to_hashable(value: Any) -> Any:
    """Lists (and nested dicts, as sorted pairs) become tuples so configs stay hashable."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _to_hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_to_hashable(v) for v in value)
    return value


def build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """``cls(**values)`` with nested dataclasses built recursively; errors name the dotted
    field."""
    values = dict(values)
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        hint = config_lib.nearest(unknown[0], names)
        raise ConfigError(f"{prefix}{unknown[0]} is not a field of {cls.__name__}; "
                          + (f"nearest: {[prefix + h for h in hint]}; " if hint else "")
                          + f"fields: {names}")
    kwargs = {}
    for name, value in values.items():
        sub = _dataclass_in(hints[name])
        if sub is not None and isinstance(value, Mapping):
            kwargs[name] = build(sub, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _to_hashable(value)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not str(e).startswith(prefix):
            raise ConfigError(f"{prefix}{e}") from None
        raise
    except TypeError as e:  # a wrong type that the dataclass could not even hold
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def _section_defaults(cls: type) -> dict[str, Any]:
    """Every field of a config dataclass at its default (nested dataclasses as dicts)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        else:
            value = f.default_factory()
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def _merge(base: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in values.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def complete(cd: Any) -> Any:
    """A config file's ConfigDict with every field of every section present (at its default
    where the file is silent), so any field can be overridden on the command line
    (``--config.rl.loss.entropy_coef=0.01``). Config files return ``complete(c)``."""
    import ml_collections
    values = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
    full = _merge(_section_defaults(ExperimentConfig), values)
    return ml_collections.ConfigDict(full)


def parse_config_arg(arg: str, known_flags: set[str], known_values: set[str]
                     ) -> tuple[set[str], dict[str, str]]:
    """A config file's ``FILE:ARG`` string, comma-separated flags and key=value pairs
    ("correction=tis,seed=1,local"), as (flags, values); an unknown name raises ValueError."""
    flags, values = set(), {}
    for item in filter(None, arg.split(",")):
        key, sep, value = item.partition("=")
        if sep:
            values[key] = value
        else:
            flags.add(key)
    unknown = (flags - known_flags) | (set(values) - known_values)
    if unknown:
        raise ValueError(f"unknown args {sorted(unknown)}; flags: {sorted(known_flags)}, "
                         f"key=value: {sorted(known_values)}")
    return flags, values


def model_section(preset: str, **overrides) -> dict[str, Any]:
    """A config file's ``model`` section: every `ModelConfig` field of ``preset`` (so any of them
    can be overridden on the command line, ``--config.model.hidden_size=128``) plus the
    preset's name, with ``overrides`` applied."""
    if preset not in presets.PRESETS:
        raise ConfigError(f"model.preset={preset!r} is invalid: must be one of "
                          f"{sorted(presets.PRESETS)}")
    return {"preset": preset, **dataclasses.asdict(presets.get(preset)), **overrides}


def from_config_dict(cd: Any) -> ExperimentConfig:
    """Validates an `ml_collections.ConfigDict` (or plain dict) into an `ExperimentConfig`."""
    values = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
    values = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in values.items()}
    model_values = dict(values.pop("model", {}))
    preset = model_values.pop("preset", None)
    if preset is not None:
        if preset not in presets.PRESETS:
            raise ConfigError(f"model.preset={preset!r} is invalid: must be one of "
                              f"{sorted(presets.PRESETS)}")
        base = dataclasses.asdict(presets.get(preset))
        model_values = {**base, **model_values}
    task = values.get("task")
    if isinstance(task, Mapping) and isinstance(task.get("kwargs"), Mapping):
        values["task"] = {**task, "kwargs": tuple(sorted(task["kwargs"].items()))}
    return build(ExperimentConfig, {**values, "model": model_values})


def to_dict(cfg: Any) -> Any:
    """JSON-able view of a config tree (for config.json)."""
    return dataclasses.asdict(cfg)
