"""Mismatch probe: hand-checked bucketing and flips; ~0 for an fp32 engine, > 0 for bf16."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax.model import Transformer
from ring_jax.rollout import probe, reference
from ring_jax.rollout.engine import Engine
from ring_jax.rollout.precision import InferencePrecision
from ring_jax.rollout.types import Request, SamplingParams


def test_report_hand_checked():
    # A "model" whose log-probs are log(1/4) everywhere and which always picks experts {0, 1}.
    V = 4

    def forward(variables, tokens_BT):
        B, T = tokens_BT.shape
        return jnp.zeros((B, T, V)), jnp.broadcast_to(jnp.array([1, 0]), (2, B, T, 2))

    base = np.log(0.25)
    r = Request("a", np.array([1, 2], np.int32), tokens=np.array([3, 0, 1], np.int32),
                logprobs=np.array([base, base - 0.5, base + 0.25], np.float32),
                versions=np.zeros(3, np.int32),
                # token 1 flips one expert in layer 0; token 2 has the set in another order
                expert_ids=np.array([[[0, 1], [0, 1]], [[0, 2], [1, 0]], [[1, 0], [0, 1]]],
                                    np.int32))
    report = probe.probe_mismatch(forward, None, [r], bucket_edges=(0, 1, 8))
    np.testing.assert_allclose(report.abs_dlogp_mean_by_bucket, [0.0, 0.375], atol=1e-6)
    np.testing.assert_allclose(report.abs_dlogp_max_by_bucket, [0.0, 0.5], atol=1e-6)
    np.testing.assert_array_equal(report.tokens_by_bucket, [1, 2])
    np.testing.assert_allclose(report.expert_flip_frac_by_layer, [1 / 3, 0.0])
    m = report.metrics()
    assert m["mismatch/abs_dlogp_mean_pos1-8"] == pytest.approx(0.375, abs=1e-6)
    assert m["moe/expert_flip_frac"] == pytest.approx(1 / 6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_mismatch_is_zero_in_fp32_and_not_in_bf16(tiny_cfg, tiny_variables, fp32_engine,
                                                         make_engine, dtype):
    if dtype == "float32":
        engine = fp32_engine
        engine.drain()
        engine.load_weights(tiny_variables, 0)
    else:
        engine = make_engine(tiny_cfg, tiny_variables, dtype)
    rng = np.random.default_rng(0)
    engine.add([Request(f"p{i}", rng.integers(0, 512, size=12).astype(np.int32),
                        SamplingParams(max_new_tokens=48), seed=i) for i in range(8)])
    rollouts = engine.step().finished
    trainer = reference.model_forward(
        Transformer(dataclasses.replace(tiny_cfg, dtype="float32", param_dtype="float32")),
        record_expert_ids=True)
    report = probe.probe_mismatch(trainer, tiny_variables, rollouts)
    assert report.tokens_by_bucket.sum() == 8 * 48
    if dtype == "float32":
        assert report.abs_dlogp_max < 1e-5
        np.testing.assert_array_equal(report.expert_flip_frac_by_layer, 0.0)
    else:
        # bf16 weights/activations/cache: small but real log-prob gaps, and some near-tied
        # router scores resolve differently (the MoE failure mode IcePop addresses).
        assert 1e-4 < report.abs_dlogp_mean < 0.1
        assert report.expert_flip_frac_by_layer.max() > 0


@pytest.mark.slow
@pytest.mark.parametrize("policy", [dict(fp8_expert_weights=True), dict(router_noise_std=0.3)],
                         ids=["fp8-experts", "router-noise"])
def test_deliberate_mismatch_knobs_show_up_in_the_probe(tiny_cfg, tiny_variables, fp32_engine,
                                                        policy):
    engine = Engine.from_model(tiny_cfg, tiny_variables, fp32_engine.config,
                               InferencePrecision("float32", **policy))
    rng = np.random.default_rng(0)
    engine.add([Request(f"q{i}", rng.integers(0, 512, size=12).astype(np.int32),
                        SamplingParams(max_new_tokens=32), seed=i) for i in range(4)])
    trainer = reference.model_forward(Transformer(tiny_cfg), record_expert_ids=True)
    report = probe.probe_mismatch(trainer, tiny_variables, engine.step().finished)
    assert report.abs_dlogp_mean > 1e-4  # the unperturbed fp32 engine gives < 1e-6
    if "router_noise_std" in policy:
        assert report.expert_flip_frac_by_layer.max() > 0.05
