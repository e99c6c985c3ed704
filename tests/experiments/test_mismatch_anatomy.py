"""experiments/mismatch_anatomy.py (issue 7, study 1): the matched dense model (fast) and the
whole study at its tiny size into tmp_path, including the RL-trained-vs-start arm on a small
hand-made workdir (slow)."""
from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import numpy as np
import pytest

from ring_jax.model import Transformer, presets
from ring_jax.train import checkpoint as checkpoint_lib


@pytest.fixture(scope="module")
def ma(experiment_file):
    return experiment_file("mismatch_anatomy")


@pytest.mark.parametrize("size", ["local", "tiny"])
def test_dense_model_matches_the_moe_active_parameter_count(ma, size):
    moe = ma.get_config(size).moe
    dense = ma.matched_dense(moe)
    assert not dense.is_moe and moe.is_moe
    assert dense.num_layers == moe.num_layers and dense.hidden_size == moe.hidden_size
    target = presets.param_count(moe)[1]
    got = presets.param_count(dense)[1]
    per_width = presets.param_count(dataclasses.replace(
        dense, intermediate_size=dense.intermediate_size + 1))[1] - got
    # The closest width: one unit more or less would be at least as far from the target.
    assert abs(got - target) <= per_width / 2
    assert per_width == 3 * moe.hidden_size * moe.num_layers


def _fake_rl_workdir(path: str, cfg) -> None:
    """config.json, metrics.jsonl + an SFT start and a different 'trained' policy, as an RL
    workdir has."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model": dataclasses.asdict(cfg),
                   "task": {"name": "addition", "kwargs": {"min_size": 2, "max_size": 2}}}, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step, pass1 in ((0, 0.25), (1, 0.5), (2, 0.625)):
            f.write(json.dumps({"step": step, "eval/pass@1": pass1}) + "\n")
        f.write(json.dumps({"step": 3, "rl/reward_mean": 0.5}) + "\n")
    variables = jax.jit(Transformer(cfg).init)(jax.random.key(0), np.zeros((1, 8), np.int32))
    trained = jax.tree.map(lambda w: w * 1.5, variables["params"])
    cfg_ckpt = checkpoint_lib.CheckpointConfig(async_save=False)
    for sub, params in (("sft", variables["params"]), ("", trained)):
        with checkpoint_lib.Checkpointer(os.path.join(path, sub, "checkpoints"), cfg_ckpt) as c:
            c.save(1, state={"params": params, "router": variables["router"]})


def _finite_numbers(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _finite_numbers(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _finite_numbers(v)
    elif isinstance(tree, float):
        yield tree


@pytest.mark.slow
def test_tiny_study_writes_finite_results_and_figures(ma, tmp_path):
    study = ma.get_config("tiny")
    workdir = str(tmp_path / "rl")
    _fake_rl_workdir(workdir, presets.get("tiny"))
    out = str(tmp_path / "out")
    results = ma.run_study(study, out, str(tmp_path / "work"), trained_workdir=workdir)

    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f) == json.loads(json.dumps(results))
    for name in ("fig1_abs_dlogp_hist.png", "fig2_position.png", "fig3_flips_vs_depth.png",
                 "fig4_training.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000, name
    arms = results["arms"]
    assert set(arms) == {"moe/fp32", "moe/bf16", "moe/fp8", "dense/fp32", "dense/bf16",
                         "rl_start/bf16", "rl_start/fp8", "rl_trained/bf16", "rl_trained/fp8"}
    assert all(math.isfinite(x) for x in _finite_numbers(results))
    for key, arm in arms.items():
        assert arm["tokens"] == sum(b["tokens"] for b in arm["by_position"]), key
        assert 0 <= arm["abs_dlogp_mean"] <= arm["abs_dlogp_max"], key
    # MoE arms report one flip fraction per MoE layer; dense arms none.
    assert len(arms["moe/bf16"]["expert_flip_frac_by_layer"]) == study.moe.num_moe_layers
    assert "expert_flip_frac_by_layer" not in arms["dense/bf16"]
    # The fp32 engine is the control: the same numerics as the trainer up to reduction order.
    assert arms["moe/fp32"]["abs_dlogp_max"] < 1e-4
    assert arms["moe/fp32"]["expert_flip_frac"] == 0.0
    assert arms["moe/bf16"]["abs_dlogp_mean"] > 10 * arms["moe/fp32"]["abs_dlogp_mean"]
    # The SFT trains with the trainer's dropless dispatch; its tail is recorded.
    assert results["models"]["moe"]["sft"]["moe/dropped_frac"] == 0.0
    assert results["models"]["moe"]["sft"]["steps"] == study.sft_steps
    assert results["trained"]["pass@1_first"] == 0.25
    # The policy measured is the newest checkpoint (step 1): evaluations after it are not its.
    assert results["trained"]["rl_steps"] == 1
    assert results["trained"]["pass@1_last"] == 0.5
    # summary.md is a function of results.json alone (what --from_results regenerates).
    with open(os.path.join(out, "summary.md")) as f:
        assert f.read() == ma.markdown_tables(json.loads(json.dumps(results)))


def test_prompts_are_the_fixed_evaluation_set(ma):
    from ring_jax.data import tasks
    from ring_jax.data.tokenizer import get_tokenizer
    from ring_jax.train import evaluate
    task, tokenizer = tasks.get("addition", min_size=2, max_size=2), get_tokenizer("byte")
    got = ma.prompts(task, tokenizer, 8)
    want = evaluate.eval_records(task, tokenizer, 8)
    assert [p.tolist() for p in got] == [list(r["prompt_tokens"]) for r in want]
