"""``init_from``: the policy a run starts from, checked at config time and loaded read-only.

Two kinds of directory are accepted:

  workdir   an SFT stage directory (``<run>/sft``) or an RL workdir: a ``checkpoints/`` holding
            at least one finished step; the latest step's ``params`` and ``router`` are loaded
            (`sft.load_policy`). A ring_jax ``config.json`` in it or in its parent (the run
            that wrote it) is compared with the experiment's ``model``.
  hf        a local Hugging Face checkpoint (`ring_jax.model.hf`): ``config.json`` +
            ``*.safetensors`` (or a sharded index) and no ``checkpoints/``; its architecture
            must be the experiment's ``model``.

What a run does with it (`rl_loop.run`): with ``sft.num_steps > 0`` the SFT stage starts from
``init_from`` (not from scratch) and RL starts from the SFT result; with ``sft.num_steps = 0``
RL starts from ``init_from``. Nothing is ever written into ``init_from``: `check_workdir`
refuses a workdir (or its SFT stage directory) that is ``init_from`` itself.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax

from ring_jax import config as config_lib
from ring_jax.config import ConfigError
from ring_jax.model import hf
from ring_jax.model.config import ModelConfig
from ring_jax.train import sft

# ModelConfig fields that may differ between the checkpoint and the experiment: numerics and
# MoE dispatch, not the architecture.
FREE_FIELDS = ("param_dtype", "dtype", "moe_impl", "capacity_factor", "min_capacity",
               "num_mtp_layers", "initializer_range", "remat_policy", "attention_chunk",
               "moe_token_chunk", "scan_layers")
KINDS = ("workdir", "hf")
_ALLOWED = ("must be an SFT/RL workdir with a finished checkpoint in checkpoints/, or a local "
            "HF checkpoint directory (config.json + *.safetensors)")


def kind(path: str) -> str:
    """'workdir' or 'hf'; ConfigError (field ``init_from``) for anything else."""
    if not os.path.exists(path):
        config_lib.fail("init_from", path, f"does not exist: {_ALLOWED}")
    if not os.path.isdir(path):
        config_lib.fail("init_from", path, f"is not a directory: {_ALLOWED}")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "workdir"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    config_lib.fail("init_from", path, f"has neither checkpoints/ nor config.json: {_ALLOWED}")


def checkpoint_steps(path: str) -> list[int]:
    """The finished steps in ``path/checkpoints`` (orbax names a finished step by its number;
    an interrupted save is a temporary directory)."""
    ckpt_dir = os.path.join(path, "checkpoints")
    return sorted(int(name) for name in os.listdir(ckpt_dir)
                  if name.isdigit() and os.path.isdir(os.path.join(ckpt_dir, name)))


def architecture_diff(checkpoint: ModelConfig | Mapping[str, Any], model: ModelConfig
                      ) -> list[str]:
    """'model.<field>=<ours> but the checkpoint has <theirs>' for every architecture field
    that differs (FREE_FIELDS excepted)."""
    theirs = (dataclasses.asdict(checkpoint) if dataclasses.is_dataclass(checkpoint)
              else dict(checkpoint))
    out = []
    for f in dataclasses.fields(model):
        if f.name in FREE_FIELDS or f.name not in theirs:
            continue
        ours, other = getattr(model, f.name), theirs[f.name]
        if ours != other:
            out.append(f"model.{f.name}={ours!r} but the checkpoint has {other!r}")
    return out


def _fail_on_diff(path: str, diff: list[str]) -> None:
    if diff:
        config_lib.fail("init_from", path, "the checkpoint's architecture differs from model: "
                        + ", ".join(diff))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"init_from: cannot read {path}: {e}") from None


def validate(path: str, model: ModelConfig) -> str:
    """Checks ``init_from`` before anything compiles; returns its kind. Reads only: file
    listings and JSON headers, no weights."""
    found = kind(path)
    if found == "workdir":
        if not checkpoint_steps(path):
            config_lib.fail("init_from", path, f"{os.path.join(path, 'checkpoints')} holds no "
                            f"finished checkpoint (an empty or interrupted run?): {_ALLOWED}")
        for run_dir in (path, os.path.dirname(os.path.abspath(path))):
            config_json = os.path.join(run_dir, "config.json")
            if os.path.isfile(config_json):
                recorded = _read_json(config_json).get("model")
                if isinstance(recorded, Mapping):
                    _fail_on_diff(path, architecture_diff(recorded, model))
                break
        return found
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") for n in names):
        config_lib.fail("init_from", path, f"has config.json but no *.safetensors: {_ALLOWED}")
    try:
        hf_cfg, _ = hf.config_from_hf(_read_json(os.path.join(path, "config.json")))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"init_from={path!r} is invalid: its config.json is not a supported "
                          f"HF config: {e}") from None
    _fail_on_diff(path, architecture_diff(hf_cfg, model))
    return found


def load_hf(path: str, model: ModelConfig) -> dict:
    """Variables (numpy) of a local HF checkpoint whose architecture is ``model``'s."""
    hf_cfg, variables = hf.load(path, param_dtype=model.param_dtype)
    _fail_on_diff(path, architecture_diff(hf_cfg, model))
    return variables


def load_policy(path: str, model: ModelConfig, target: Mapping[str, Any]) -> dict:
    """{"params", "router"} from ``path`` (either kind), placed like ``target`` (arrays or
    ShapeDtypeStructs with shardings). Reads only."""
    target = {"params": target["params"], "router": target.get("router", {})}
    if kind(path) == "hf":
        variables = load_hf(path, model)
        variables = {"params": variables["params"], "router": variables.get("router", {})}
        return jax.device_put(variables, jax.tree.map(lambda x: x.sharding, target))
    return sft.load_policy(path, target)


def check_workdir(init_from: str, workdir: str, sft_steps: int) -> None:
    """A run never writes into ``init_from``: its workdir, and its SFT stage directory when
    it runs SFT, must be other directories."""
    if not init_from:
        return
    source = os.path.realpath(init_from)
    writes = [workdir] + ([os.path.join(workdir, "sft")] if sft_steps else [])
    for directory in writes:
        if os.path.realpath(directory) == source:
            config_lib.fail("init_from", init_from, f"is the directory this run writes "
                            f"({directory}); use another --workdir")
