"""`derive(cfg)`: the run seed reaches every consumer through its own stream, and one pinned stream
changes nothing else. Each stream is checked at its consumer (SFT batches, the RL prompt stream,
model init, the scheduler's request seeds, the evaluation's request seeds), not only as a number."""
import dataclasses
import functools

import jax
import numpy as np
import pytest

from ring_jax.config import ConfigError
from ring_jax.data import pipeline, tasks
from ring_jax.data.tokenizer import get_tokenizer
from ring_jax.model import Transformer
from ring_jax.scheduler import derive_seed
from ring_jax.train import derive as derive_lib
from ring_jax.train import experiment
from ring_jax.train.sft import SFTBatches

TOKENIZER = get_tokenizer("byte")


def _config(seed=0, sections=None, **seeds):
    values = {"seed": seed, "seeds": seeds,
              "model": {"preset": "tiny", "num_layers": 2, "hidden_size": 16, "num_heads": 2,
                        "num_kv_heads": 1, "head_dim": 8, "intermediate_size": 16,
                        "num_experts": 4, "moe_intermediate_size": 8},
              "sft": {"seq_len": 32, "batch_size": 2},
              "scheduler": {"mode": "sync", "group_size": 2, "batch_size": 4, "max_seq_len": 64},
              "engine": {"max_len": 64}}
    for name, section in (sections or {}).items():
        values[name] = {**values.get(name, {}), **section}
    return experiment.derive(experiment.from_config_dict(values))


@functools.lru_cache(maxsize=1)
def _jitted_init(model_cfg):
    """One compiled init for every seed (the key is an argument, not a constant)."""
    model = Transformer(model_cfg)
    return jax.jit(lambda key: model.init(key, np.zeros((1, 4), np.int32))["params"])


@functools.lru_cache(maxsize=None)
def _init_params(model_cfg, init_seed: int) -> np.ndarray:
    """A flat vector of the model's initial params (the ``init`` stream's consumer)."""
    params = _jitted_init(model_cfg)(jax.random.key(init_seed))
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])


def _streams(cfg) -> dict[str, object]:
    """What each stream's consumer produces under ``cfg``."""
    task = tasks.get(cfg.task.name, **dict(cfg.task.kwargs))
    sft_batch = next(SFTBatches(task, TOKENIZER, cfg.sft))
    prompts = pipeline.prompt_dataset(task, TOKENIZER, seed=cfg.seeds.prompts,
                                      num_prompts=cfg.task.num_prompts)
    return {
        "init": _init_params(cfg.model, cfg.seeds.init),
        "sft": sft_batch["tokens"],
        "prompts": [prompts[i]["prompt_text"] for i in range(8)],
        "sampling": [derive_seed(cfg.scheduler.seed, g, i) for g in range(3) for i in range(2)],
        "eval": cfg.seeds.eval,  # evaluate() seeds its sampled requests from it alone
    }


def _equal(a, b) -> bool:
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def test_two_run_seeds_differ_in_every_stream_and_one_seed_reproduces_all():
    a, a_again, b = _streams(_config(0)), _streams(_config(0)), _streams(_config(1))
    assert set(a) == set(derive_lib.STREAMS)
    for name in derive_lib.STREAMS:
        assert _equal(a[name], a_again[name]), name  # same seed: same stream
        assert not _equal(a[name], b[name]), name  # another seed: another stream


@pytest.mark.parametrize("pinned", derive_lib.STREAMS)
def test_pinning_one_stream_changes_only_that_stream(pinned):
    base = _config(3)
    pinned_cfg = _config(3, **{pinned: 12345})
    assert getattr(pinned_cfg.seeds, pinned) == 12345
    a, b = _streams(base), _streams(pinned_cfg)
    for name in derive_lib.STREAMS:
        assert _equal(a[name], b[name]) == (name != pinned), name
    # A pinned stream is the same whatever the run seed.
    assert _equal(b[pinned], _streams(_config(4, **{pinned: 12345}))[pinned])


def test_derive_fills_the_derived_fields_and_is_idempotent():
    cfg = _config(5)
    assert cfg.sft.seed == cfg.seeds.sft == derive_lib.stream_seed(5, "sft")
    assert cfg.scheduler.seed == cfg.seeds.sampling == derive_lib.stream_seed(5, "sampling")
    assert TOKENIZER.eos_id in cfg.scheduler.sampling.stop_token_ids
    assert cfg.scheduler.expert_ids_shape is None  # the engine records no routing
    assert len(set(dataclasses.astuple(cfg.seeds))) == len(derive_lib.STREAMS)
    assert experiment.derive(cfg) == cfg
    # Recorded in config.json.
    assert experiment.to_dict(cfg)["seeds"]["prompts"] == derive_lib.stream_seed(5, "prompts")


def test_stream_seed_is_a_stable_hash():
    # Hand-checked: first 4 bytes (little-endian) of sha256(b"0/sft"), top bit cleared. A
    # Python `hash` (salted per process) or a plain seed + offset would not give this number.
    import hashlib
    digest = hashlib.sha256(b"0/sft").digest()
    assert derive_lib.stream_seed(0, "sft") == int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
    assert 0 <= derive_lib.stream_seed(2**31 - 1, "eval") < 2**31


def test_routing_shape_comes_from_the_model_when_the_engine_records_it():
    c = experiment.from_config_dict({"model": {"preset": "tiny"},
                                     "engine": {"record_expert_ids": True, "max_len": 64},
                                     "scheduler": {"max_seq_len": 64}})
    cfg = experiment.derive(c)
    assert cfg.scheduler.expert_ids_shape == (c.model.num_moe_layers,
                                              c.model.num_experts_per_tok)


@pytest.mark.parametrize("field,stream", [("sft", "sft"), ("scheduler", "sampling")])
def test_setting_a_derived_seed_directly_names_the_stream_to_pin(field, stream):
    with pytest.raises(ConfigError, match=rf"{field}\.seed=7 is invalid: .*seeds\.{stream}=7"):
        _config(sections={field: {"seed": 7}})
    with pytest.raises(ConfigError, match=r"seeds\.init=-2 is invalid"):
        experiment.from_config_dict({"seeds": {"init": -2}})


@pytest.mark.parametrize("knob", [{"fp8_expert_weights": True}, {"router_noise_std": 0.5},
                                  {"expert_scale_error_std": 0.05}])
def test_a_mismatch_study_needs_a_dropless_trainer_unless_allowed(knob):
    # The test model has E=4 experts, K=2 per token: capacity_factor >= 2 is dropless.
    dropping = {"model": {"moe_impl": "capacity", "capacity_factor": 1.5}, "precision": knob}
    with pytest.raises(ConfigError, match=r"model\.capacity_factor=1\.5 is invalid: a mismatch "
                                          r"study .* E/K=2, .*rl\.allow_trainer_drops=True"):
        _config(sections=dropping)
    _config(sections={**dropping, "rl": {"allow_trainer_drops": True}})
    _config(sections={**dropping, "model": {"moe_impl": "capacity", "capacity_factor": 2.0}})
    _config(sections={**dropping, "model": {"moe_impl": "ragged", "capacity_factor": 1.5}})
    # No mismatch knob (the quickstart's IcePop on the plain bf16 engine): drops are reported,
    # not refused.
    _config(sections={"model": {"moe_impl": "capacity", "capacity_factor": 1.5}})
