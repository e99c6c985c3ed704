"""The Tunix peer of `experiments/benchmarks/rl_step.py --peer=tunix` (issue 16).

Without google-tunix (the project's own environment) only the one-line "not installed" error
is checked; with it (``pip install -e ".[peer]"`` in a virtualenv of its own) a tiny Qwen3 MoE
runs GRPO iterations through Tunix's GRPOLearner: the same parameter count as ring_jax's model
of that shape, every response the full forced length, one optimizer update per iteration,
and a fault in Tunix's threads raised in the caller's (those two are slow-marked:
``python -m pytest -m slow tests/experiments/test_rl_step_tunix.py`` in the tunix venv).
"""
import dataclasses
import importlib.util
import os
import sys

import pytest

from ring_jax.model import ModelConfig, presets
from ring_jax.train import optim

PEER_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "benchmarks",
                         "rl_step_tunix.py")
HAS_TUNIX = importlib.util.find_spec("tunix") is not None

# Qwen3-MoE shaped (no shared expert, every layer MoE, softmax top-K renormalised, full RoPE).
TINY_QWEN3_MOE = ModelConfig(
    vocab_size=512, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
    first_k_dense_replace=0, num_experts=8, num_experts_per_tok=2, num_shared_experts=0,
    moe_intermediate_size=32, routed_scaling_factor=1.0, score_function="softmax",
    partial_rotary_factor=1.0)


def _load_peer_module():
    spec = importlib.util.spec_from_file_location("rl_step_tunix", PEER_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their module while defined
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


@pytest.mark.skipif(HAS_TUNIX, reason="tunix is installed here")
def test_missing_tunix_is_a_one_line_error():
    with pytest.raises(ModuleNotFoundError, match=r"needs google-tunix==0\.1\.7 .*\[peer\]"):
        _load_peer_module()


@pytest.fixture(scope="module")
def peer_module():
    pytest.importorskip("tunix")
    return _load_peer_module()


def _peer(peer_module, **kwargs):
    return peer_module.TunixPeer(
        TINY_QWEN3_MOE, optim.make_optimizer(optim.OptimConfig(learning_rate=1e-5)),
        num_prompts=2, group_size=4, prompt_len=16, new_tokens=8,
        loss_aggregation="seq_mean_token_mean", **kwargs)


@pytest.mark.slow  # ~30 s of compiles (Tunix's sampler and train step)
def test_peer_does_the_same_work_as_ring_jax(peer_module):
    peer = _peer(peer_module)
    try:
        # Same shape, same parameter count (a different count means a mis-mapped field).
        assert peer.num_params == presets.param_count(TINY_QWEN3_MOE)[0]
        runs = [peer.run_iteration() for _ in range(2)]
    finally:
        peer.close()
    for run in runs:
        # 2 prompts x G=4 rows, each the full 8 forced tokens, all trained on; one update.
        assert (run.rows, run.completion_len, run.prompt_len) == (8, 8, 16)
        assert run.tokens == 8 * 8
        assert run.updates == 1
        assert 0 < run.rollout and 0 <= run.reward_advantage
        assert run.total == pytest.approx(run.rollout + run.reward_advantage + run.update)
    assert str(peer.param_dtype) == str(peer.rollout_dtype) == "float32"


@pytest.mark.slow
def test_a_fault_in_tunix_surfaces_in_the_caller(peer_module):
    def broken_reward(prompts, completions, **_):
        raise ValueError("reward service down")

    peer = _peer(peer_module, reward_fn=broken_reward)
    try:
        with pytest.raises(RuntimeError, match="the Tunix peer failed") as info:
            peer.run_iteration()
        cause = info.value.__cause__
        while cause is not None and not isinstance(cause, ValueError):
            cause = cause.__cause__
        assert cause is not None and "reward service down" in str(cause)
        with pytest.raises(RuntimeError, match="has stopped"):
            peer.run_iteration()
    finally:
        peer.close()


def test_non_qwen3_shape_is_rejected_naming_the_field(peer_module):
    with pytest.raises(ValueError, match=r"model\.num_shared_experts=1"):
        peer_module.qwen3_config(dataclasses.replace(TINY_QWEN3_MOE, num_shared_experts=1))
