"""`init_from`: validated at config time (path, kind, architecture) without writing into it;
HF weights come back unchanged; SFT starts from it and RL from the SFT result."""
import dataclasses
import importlib.util
import json
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax.config import ConfigError
from ring_jax.data import tasks
from ring_jax.data.tokenizer import get_tokenizer
from ring_jax.model import Transformer, hf, presets
from ring_jax.train import experiment, init_from, optim, rl_loop, sft

CFG = presets.get("tiny")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    variables = jax.jit(Transformer(CFG).init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))
    path = str(tmp_path_factory.mktemp("hf"))
    hf.save(path, CFG, jax.device_get(variables), layout="glm4_moe")
    return path, variables


def test_load_hf_returns_the_saved_weights(checkpoint_dir):
    path, variables = checkpoint_dir
    loaded = init_from.load_hf(path, dataclasses.replace(CFG, moe_impl="reference"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 loaded, jax.device_get(variables))


def test_load_hf_names_architecture_mismatch(checkpoint_dir):
    path, _ = checkpoint_dir
    with pytest.raises(ConfigError, match=r"model.num_layers=3 but the checkpoint has 2"):
        init_from.load_hf(path, dataclasses.replace(CFG, num_layers=3))


# ---------------------------------------------------------------- validation at config time


def _listing(path):
    """Every file under `path` with its size and mtime: `init_from` must never change."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = (os.path.getsize(full), os.path.getmtime(full))
    return out


def _fake_workdir(path, steps=(3,), model=None):
    """The layout `init_from.validate` accepts as an SFT/RL workdir (orbax step dirs)."""
    for step in steps:
        os.makedirs(os.path.join(path, "checkpoints", str(step)), exist_ok=True)
    os.makedirs(os.path.join(path, "checkpoints"), exist_ok=True)
    if model is not None:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"model": dataclasses.asdict(model)}, f)
    return str(path)


def test_valid_kinds(checkpoint_dir, tmp_path):
    hf_path, _ = checkpoint_dir
    assert init_from.validate(hf_path, CFG) == "hf"
    run = tmp_path / "run"
    sft_dir = _fake_workdir(run / "sft")
    _fake_workdir(run, model=CFG)  # the RL workdir that holds the SFT stage
    assert init_from.validate(sft_dir, CFG) == "workdir"
    assert init_from.validate(str(run), CFG) == "workdir"


@pytest.mark.parametrize("make,message", [
    (lambda p: str(p / "missing"), "does not exist"),
    (lambda p: (p / "file").write_text("x") and str(p / "file"), "is not a directory"),
    (lambda p: str(p), "has neither checkpoints/ nor config.json"),
    (lambda p: _fake_workdir(p, steps=()), "holds no finished checkpoint"),
    (lambda p: (p / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir(parents=True) or str(p),
     "holds no finished checkpoint"),
    (lambda p: (p / "config.json").write_text("{}") and str(p), "no \\*.safetensors"),
    (lambda p: _fake_workdir(p, model=dataclasses.replace(CFG, hidden_size=32)),
     "model.hidden_size=64 but the checkpoint has 32"),
])
def test_invalid_init_from_is_named_at_config_time(tmp_path, make, message):
    path = make(tmp_path)
    before = _listing(tmp_path)
    with pytest.raises(ConfigError, match=f"init_from='{re.escape(path)}' is invalid: .*{message}"):
        init_from.validate(path, CFG)
    assert _listing(tmp_path) == before  # validation never writes (no checkpoints/ created)


def test_hf_architecture_and_bad_config_json_are_config_errors(checkpoint_dir, tmp_path):
    hf_path, _ = checkpoint_dir
    with pytest.raises(ConfigError, match="model.num_experts=4 but the checkpoint has 8"):
        init_from.validate(hf_path, dataclasses.replace(CFG, num_experts=4, n_group=1))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    (bad / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"cannot read .*bad/config.json"):
        init_from.validate(str(bad), CFG)


def test_experiment_config_rejects_a_missing_init_from(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "_quickstart", os.path.join(os.path.dirname(__file__), "..", "..", "experiments",
                                    "quickstart.py"))
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    values = quickstart.get_config("").to_dict()
    values["init_from"] = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="init_from=.* is invalid: does not exist"):
        experiment.from_config_dict(values)
    assert not (tmp_path / "nope").exists()


def test_load_policy_never_creates_a_checkpoint_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoints/ missing"):
        sft.load_policy(str(tmp_path), {"params": {}, "router": {}})
    assert list(tmp_path.iterdir()) == []


def test_a_run_never_writes_into_init_from(tmp_path):
    src = str(tmp_path / "src")
    with pytest.raises(ConfigError, match="is the directory this run writes"):
        init_from.check_workdir(src, src, sft_steps=0)
    with pytest.raises(ConfigError, match="is the directory this run writes"):
        init_from.check_workdir(os.path.join(src, "sft"), src, sft_steps=5)
    init_from.check_workdir(os.path.join(src, "sft"), src, sft_steps=0)  # RL writes src only
    init_from.check_workdir(src, str(tmp_path / "other"), sft_steps=5)


# ---------------------------------------------------------------- SFT after init_from


@pytest.mark.slow
def test_sft_starts_from_init_from(checkpoint_dir, tmp_path):
    """One SFT step from an HF init_from: Adam's first update moves each weight by at most the
    learning rate, so every weight stays within lr of the checkpoint's. Training from scratch
    (what happened before) would leave weights ~0.1 away from it."""
    hf_path, saved = checkpoint_dir
    before = _listing(hf_path)
    lr = 1e-3
    tok = get_tokenizer("byte")
    model = Transformer(CFG)
    cfg = sft.SFTConfig(seq_len=48, batch_size=1, num_steps=1)
    state = sft.train_sft(
        model, tasks.get("addition"), tok, tmp_path / "sft", cfg,
        optim.OptimConfig(learning_rate=lr, warmup_steps=0),
        initial_policy=lambda target: init_from.load_policy(hf_path, CFG, target))
    saved = jax.device_get(saved)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                         state["params"], saved["params"])
    assert max(jax.tree.leaves(moved)) <= lr * 1.001, moved
    assert max(jax.tree.leaves(moved)) > 0  # it did train
    assert _listing(hf_path) == before


def test_rl_starts_from_the_sft_result_when_sft_ran():
    """With SFT steps, RL loads <workdir>/sft (which itself started from init_from); without,
    init_from. Before, RL loaded init_from and threw the SFT result away."""
    cfg = lambda steps, init: types.SimpleNamespace(
        init_from=init, sft=types.SimpleNamespace(num_steps=steps))
    assert rl_loop.policy_source(cfg(5, "/some/init"), "/w") == "/w/sft"
    assert rl_loop.policy_source(cfg(0, "/some/init"), "/w") == "/some/init"
    assert rl_loop.policy_source(cfg(5, ""), "/w") == "/w/sft"
    assert rl_loop.policy_source(cfg(0, ""), "/w") == ""
