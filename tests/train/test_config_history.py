"""config_history: which fields may change on resume, and config.json's history."""
import json
import logging
import os

import pytest

from ring_jax.config import ConfigError
from ring_jax.train import config_history, experiment

CONFIG = {"seed": 0, "model": {"hidden_size": 64, "num_experts_per_tok": 2},
          "rl": {"num_steps": 3, "optim": {"learning_rate": 1e-4}},
          "scheduler": {"group_size": 4, "num_reward_workers": 2},
          "eval": {"every": 2}, "task": {"kwargs": [["max_size", 2]]}}


def _with(**dotted):
    cfg = json.loads(json.dumps(CONFIG))
    for name, value in dotted.items():
        *parents, leaf = name.split("__")
        target = cfg
        for key in parents:
            target = target[key]
        target[leaf] = value
    return cfg


def _workdir(tmp_path, rl_steps=(3,), sft_steps=()):
    """A run directory with config.json and (empty) committed step directories."""
    for step in rl_steps:
        (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
    for step in sft_steps:
        (tmp_path / "sft" / "checkpoints" / str(step)).mkdir(parents=True)
    config_history.record(str(tmp_path), CONFIG)   # the first start (no checkpoint yet)
    return tmp_path


def _read(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("field, safe", [
    ("rl.num_steps", True), ("eval.every", True), ("eval.num_prompts", True),
    ("checkpoint.save_every", True), ("mesh.data", True), ("sft.log_every", True),
    ("model.hidden_size", False), ("model.num_experts_per_tok", False),
    ("rl.optim.learning_rate", False), ("scheduler.group_size", False), ("task.name", False),
    ("seed", False), ("sft.num_steps", False), ("init_from", False),
    ("rl.num_steps_extra", False), ("evaluation", False),   # prefixes match whole names only
])
def test_is_safe(field, safe):
    assert config_history.is_safe(field) is safe


def test_state_fields_changed_refused_and_nothing_written(tmp_path):
    workdir = _workdir(tmp_path)
    before = sorted(os.listdir(workdir))
    new = _with(model__hidden_size=128, model__num_experts_per_tok=1, scheduler__group_size=8,
                rl__num_steps=10)
    with pytest.raises(ConfigError) as err:
        config_history.record(str(workdir), new)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    for part in ("model.hidden_size: 64 -> 128", "model.num_experts_per_tok: 2 -> 1",
                 "scheduler.group_size: 4 -> 8"):
        assert part in message, message
    assert "rl.num_steps" not in message   # safe: not among the refused
    assert sorted(os.listdir(workdir)) == before
    assert _read(workdir / "config.json") == CONFIG


def test_safe_changes_logged_and_history_kept(tmp_path, caplog):
    workdir = _workdir(tmp_path, rl_steps=(2, 3))
    new = _with(rl__num_steps=10, eval__every=5)
    with caplog.at_level(logging.WARNING, logger=config_history.__name__):
        changes = config_history.record(str(workdir), new)
    assert [str(c) for c in changes] == ["eval.every: 2 -> 5", "rl.num_steps: 3 -> 10"]
    assert sum("rl.num_steps: 3 -> 10" in r.getMessage() for r in caplog.records) == 1
    assert _read(workdir / "config.json") == new
    assert _read(workdir / "config.3.json") == CONFIG   # what ran up to step 3
    # A second change at the same step keeps both earlier versions.
    config_history.record(str(workdir), _with(rl__num_steps=20))
    assert _read(workdir / "config.3.1.json") == new
    # Unchanged: nothing new written.
    config_history.record(str(workdir), _with(rl__num_steps=20))
    assert sorted(n for n in os.listdir(workdir) if n.startswith("config")) == [
        "config.3.1.json", "config.3.json", "config.json"]


def test_sft_checkpoint_counts_as_a_resume(tmp_path):
    workdir = _workdir(tmp_path, rl_steps=(), sft_steps=(2,))
    with pytest.raises(ConfigError, match="model.hidden_size: 64 -> 32"):
        config_history.record(str(workdir), _with(model__hidden_size=32))
    changes = config_history.record(str(workdir), _with(rl__num_steps=7))
    assert [c.field for c in changes] == ["rl.num_steps"]
    assert _read(workdir / "config.0.json") == CONFIG   # no RL step yet


def test_without_checkpoint_any_change_overwrites(tmp_path):
    workdir = _workdir(tmp_path, rl_steps=())
    assert config_history.record(str(workdir), _with(model__hidden_size=128)) == []
    assert _read(workdir / "config.json")["model"]["hidden_size"] == 128
    assert sorted(os.listdir(workdir)) == ["config.json"]


def test_added_or_removed_fields_are_allowed(tmp_path):
    workdir = _workdir(tmp_path)
    new = _with(rl__new_field=1)
    del new["eval"]
    fields = {c.field: (c.old, c.new) for c in config_history.record(str(workdir), new)}
    assert fields == {"rl.new_field": ("<absent>", 1), "eval": ({"every": 2}, "<absent>")}


def test_write_false_validates_only(tmp_path):
    workdir = _workdir(tmp_path)
    config_history.record(str(workdir), _with(rl__num_steps=9), write=False)
    assert _read(workdir / "config.json") == CONFIG
    with pytest.raises(ConfigError):
        config_history.record(str(workdir), _with(seed=1), write=False)


def test_experiment_config_round_trips_without_changes(tmp_path):
    """The dataclass tree the loop records diffs clean against its own config.json (tuples of
    task kwargs become lists; a false 'change' here would block every resume)."""
    cfg = experiment.from_config_dict(experiment.complete({
        "model": experiment.model_section("tiny"), "engine": {"max_len": 512},
        "scheduler": {"max_seq_len": 128},
        "task": {"name": "addition", "kwargs": {"min_size": 2, "max_size": 2}}}))
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)
    config_history.record(str(tmp_path), cfg)
    assert config_history.record(str(tmp_path), cfg) == []
    import dataclasses
    bigger = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hidden_size=128))
    with pytest.raises(ConfigError, match=r"model.hidden_size: \d+ -> 128"):
        config_history.record(str(tmp_path), bigger)
