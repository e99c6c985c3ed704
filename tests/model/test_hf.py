"""hf.save / hf.load without torch: round trips in both layouts and dtypes, sharded index,
clear errors for missing and unknown tensors."""
import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ring_jax.model import hf, presets
from tests.model.conftest import random_variables


@pytest.fixture(scope="module")
def tiny():
    cfg = presets.get("tiny")
    return cfg, jax.tree.map(np.asarray, random_variables(cfg, bias_scale=0.1))


@pytest.mark.parametrize("layout", hf.LAYOUTS)
def test_round_trip(tiny, tmp_path, layout):
    cfg, variables = tiny
    hf.save(str(tmp_path), cfg, variables, layout=layout, max_shard_bytes=50_000)
    index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    cfg2, variables2 = hf.load(str(tmp_path), moe_impl=cfg.moe_impl)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, variables2, variables)


def test_bfloat16_storage_keeps_bias_float32(tiny, tmp_path):
    cfg, variables = tiny
    hf.save(str(tmp_path), cfg, variables, layout="bailing", dtype="bfloat16")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["model.layers.1.mlp.gate.expert_bias"].dtype == np.float32
    assert tensors["lm_head.weight"].dtype.name == "bfloat16"
    qkv = tensors["model.layers.0.attention.query_key_value.weight"]
    assert qkv.shape == ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, cfg.hidden_size)
    cfg2, variables2 = hf.load(str(tmp_path), param_dtype="bfloat16")
    assert cfg2.param_dtype == "bfloat16"
    np.testing.assert_allclose(variables2["params"]["embed"].astype(np.float32),
                               variables["params"]["embed"], rtol=1e-2, atol=1e-3)


def test_missing_and_unknown_tensors_are_listed(tiny, tmp_path):
    cfg, variables = tiny
    hf.save(str(tmp_path), cfg, variables, layout="glm4_moe")
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    tensors["model.layers.1.mlp.mystery.weight"] = np.zeros(2, np.float32)
    save_file(tensors, file)
    with pytest.raises(ValueError, match=r"experts\.3\.up_proj.*mystery"):
        hf.load(str(tmp_path))


def test_unsupported_configs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        hf.load(str(tmp_path))
    with pytest.raises(ValueError, match="layout"):
        hf.save(str(tmp_path), presets.get("tiny"), {}, layout="gpt2")


@pytest.mark.parametrize("layout,name", [
    ("bailing", "lm_head.weight"), ("bailing", "model.word_embeddings.weight"),
    ("glm4_moe", "lm_head.weight"), ("glm4_moe", "model.layers.1.mlp.experts.0.down_proj.weight"),
    ("bailing", "model.layers.0.attention.query_key_value.weight")])
def test_transposed_tensor_is_rejected_naming_it(tiny, tmp_path, layout, name):
    """A transposed tensor has the right element count: without a shape check before the
    reshape it would load silently scrambled."""
    cfg, variables = tiny
    hf.save(str(tmp_path), cfg, variables, layout=layout)
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    expected = list(tensors[name].shape)
    tensors[name] = np.ascontiguousarray(tensors[name].T)
    save_file(tensors, file)
    with pytest.raises(ValueError) as err:
        hf.load(str(tmp_path))
    assert f"{name}: expected {expected}, found {expected[::-1]}" in str(err.value)


def _shifted(variables, delta):
    return jax.tree.map(lambda x: x + np.asarray(delta, x.dtype), variables)


@pytest.mark.parametrize("first,second", [(50_000, 2 << 30), (2 << 30, 50_000)],
                         ids=["sharded_then_single", "single_then_sharded"])
@pytest.mark.parametrize("layout", hf.LAYOUTS)
def test_save_over_save_leaves_only_the_new_weights(tiny, tmp_path, layout, first, second):
    """A stale index of an earlier sharded save would make load return the old weights; a stale
    single file next to new shards is an 'unknown tensors' error at best."""
    cfg, variables = tiny
    path = tmp_path / "hf"
    hf.save(str(path), cfg, variables, layout=layout, max_shard_bytes=first)
    (path / "tokenizer.json").write_text("{}")  # not ours: must survive the second save
    new = _shifted(variables, 1.0)
    hf.save(str(path), cfg, new, layout=layout, max_shard_bytes=second)
    files = sorted(p.name for p in path.iterdir())
    if second == 50_000:
        assert "model.safetensors" not in files and hf.INDEX_FILE in files
    else:
        assert files == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (path / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary dirs left
    _, loaded = hf.load(str(path), moe_impl=cfg.moe_impl)
    jax.tree.map(np.testing.assert_array_equal, loaded, new)


def test_interrupted_save_keeps_the_previous_one(tiny, tmp_path, monkeypatch):
    cfg, variables = tiny
    path = tmp_path / "hf"
    hf.save(str(path), cfg, variables, layout="bailing", max_shard_bytes=50_000)
    calls = []

    def fail_on_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("No space left on device")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(hf, "save_file", fail_on_third_shard)
    with pytest.raises(OSError, match="No space"):
        hf.save(str(path), cfg, _shifted(variables, 1.0), layout="bailing",
                max_shard_bytes=50_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    _, loaded = hf.load(str(path), moe_impl=cfg.moe_impl)
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
