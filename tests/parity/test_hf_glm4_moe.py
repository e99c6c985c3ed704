"""Parity with transformers' Glm4MoeForCausalLM (the Ling 2.0 family, PAPER §4): logits within
1e-4 (fp32) and identical router choices, after checkpoint round trips through `hf.load` /
`hf.save` in both layouts."""
import dataclasses

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ring_jax.model import Transformer, hf  # noqa: E402

pytestmark = pytest.mark.parity

CONFIGS = {
    # dense first layer, 2 groups (one kept), one shared expert
    "dense_first_groups": dict(first_k_dense_replace=1, n_routed_experts=8, n_group=2,
                               topk_group=1, num_experts_per_tok=2, n_shared_experts=1),
    # every layer MoE, 4 groups (2 kept), top-3, two shared experts (one wider MLP)
    "all_moe_top3": dict(first_k_dense_replace=0, n_routed_experts=8, n_group=4,
                         topk_group=2, num_experts_per_tok=3, n_shared_experts=2),
    # no groups, no QK-norm, full rotary, GQA 4:1
    "flat_router": dict(first_k_dense_replace=1, n_routed_experts=6, n_group=1, topk_group=1,
                        num_experts_per_tok=2, n_shared_experts=1, use_qk_norm=False,
                        num_key_value_heads=1, partial_rotary_factor=1.0),
}


def _torch_model(name, seed):
    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              routed_scaling_factor=2.5, use_qk_norm=True, norm_topk_prob=True,
              attention_bias=False, rms_norm_eps=1e-6, max_position_embeddings=64,
              partial_rotary_factor=0.5, rope_theta=10000.0, tie_word_embeddings=False)
    kw.update(CONFIGS[name])
    prf = kw.pop("partial_rotary_factor")
    theta = kw.pop("rope_theta")
    config = transformers.Glm4MoeConfig(
        **kw, rope_parameters={"rope_type": "default", "rope_theta": theta,
                               "partial_rotary_factor": prf})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Glm4MoeForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the 0.02 init: real differences
            p.normal_(0.0, 0.2)
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):  # non-zero expert bias
                module.e_score_correction_bias.uniform_(-0.2, 0.2)
    return model


def _torch_forward(model, tokens):
    """Logits and, per MoE layer, the chosen experts (captured from each router)."""
    ids = []
    hooks = [m.register_forward_hook(lambda m, i, out: ids.append(out[2].numpy()))
             for m in model.modules() if type(m).__name__ == "Glm4MoeTopkRouter"]
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(np.asarray(tokens))).logits.numpy()
    for h in hooks:
        h.remove()
    return logits, [np.sort(x, -1) for x in ids]


def _ours(cfg, variables, tokens):
    logits, aux = jax.jit(lambda v, t: Transformer(cfg).apply(v, t, return_expert_ids=True))(
        variables, tokens)
    ids = np.sort(np.asarray(aux["expert_ids"]), -1)
    return np.asarray(logits), [x.reshape(-1, x.shape[-1]) for x in ids]


def _check(ours, theirs):
    (logits, ids), (ref_logits, ref_ids) = ours, theirs
    assert len(ids) == len(ref_ids)
    for layer, (a, b) in enumerate(zip(ids, ref_ids)):
        np.testing.assert_array_equal(a, b, err_msg=f"router choices differ in MoE layer {layer}")
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_routing_match_transformers(name, tmp_path):
    model = _torch_model(name, seed=len(name))
    tokens = np.random.default_rng(0).integers(0, 96, (2, 10)).astype(np.int32)
    reference = _torch_forward(model, tokens)

    # transformers -> ring_jax
    model.save_pretrained(tmp_path / "hf")
    cfg, variables = hf.load(str(tmp_path / "hf"), moe_impl="reference")
    assert cfg.num_experts == model.config.n_routed_experts
    _check(_ours(cfg, variables, tokens), reference)
    # the capacity path computes the same when nothing is dropped (C = all 20 tokens)
    _check(_ours(dataclasses.replace(cfg, moe_impl="capacity", capacity_factor=8.0), variables,
                 tokens), reference)

    # ring_jax -> glm4_moe checkpoint (sharded) -> transformers
    hf.save(str(tmp_path / "glm"), cfg, variables, layout="glm4_moe", max_shard_bytes=20_000)
    assert (tmp_path / "glm" / hf.INDEX_FILE).exists()
    reloaded = transformers.Glm4MoeForCausalLM.from_pretrained(str(tmp_path / "glm")).eval()
    _check(_torch_forward(reloaded, tokens), reference)

    # ring_jax -> BailingMoeV2 checkpoint -> ring_jax: identical variables
    hf.save(str(tmp_path / "bailing"), cfg, variables, layout="bailing")
    cfg2, variables2 = hf.load(str(tmp_path / "bailing"), moe_impl="reference")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, variables2, variables)


@pytest.mark.parametrize("factor", [1.0, 4.0])
def test_yarn_frequencies_match_transformers(factor):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from ring_jax.model import ModelConfig
    from ring_jax.model.layers import rope_frequencies

    cfg = ModelConfig(head_dim=64, partial_rotary_factor=0.5, rope_theta=50000.0,
                      rope_scaling_factor=factor, rope_original_max_position=256,
                      max_position_embeddings=1024)
    rope = {"rope_type": "yarn", "rope_theta": 50000.0, "partial_rotary_factor": 0.5,
            "factor": factor, "original_max_position_embeddings": 256,
            "beta_fast": 32.0, "beta_slow": 1.0}
    hf_cfg = transformers.Glm4MoeConfig(head_dim=64, hidden_size=256, num_attention_heads=4,
                                        max_position_embeddings=1024, rope_parameters=rope)
    inv_freq, mscale = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    ours, our_mscale = rope_frequencies(cfg)
    np.testing.assert_allclose(np.asarray(ours), inv_freq.numpy(), rtol=1e-6)
    assert our_mscale == pytest.approx(mscale)
