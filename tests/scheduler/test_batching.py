"""Hand-checked batch layout, and the state encoding round trip."""
import numpy as np
import pytest

from ring_jax.rollout.types import Request
from ring_jax.scheduler import SchedulerConfig, build_batch
from ring_jax.scheduler import state as state_lib
from ring_jax.scheduler.groups import Group


def _finished_request(rid, prompt, tokens, logprobs, versions, experts=None):
    r = Request(request_id=rid, prompt_tokens=np.array(prompt, np.int32))
    for i, (t, lp, v) in enumerate(zip(tokens, logprobs, versions)):
        r.append(t, lp, v, None if experts is None else experts[i])
    r.finish_reason = "stop"
    return r


def test_row_layout_by_hand():
    config = SchedulerConfig(mode="sync", group_size=2, batch_size=4, max_seq_len=8,
                             expert_ids_shape=(1, 2))
    experts = [np.array([[1, 2]]), np.array([[3, 4]])]
    a = _finished_request("a", [11, 12, 13], [21, 22], [-0.5, -1.5], [3, 4], experts)
    b = _finished_request("b", [11, 12, 13], [31], [-2.0], [4], [np.array([[5, 6]])])
    group = Group(group_id=9, record={"prompt_id": 0}, retries=0, members=[a, b],
                  rewards=[1.0, 0.0], cuts=[1, 0],
                  advantages=np.array([0.5, -0.5], np.float32))
    batch = build_batch([group], config)
    np.testing.assert_array_equal(batch["tokens_BT"][0], [11, 12, 13, 21, 22, 0, 0, 0])
    np.testing.assert_array_equal(batch["targets_BT"][0], [12, 13, 21, 22, 0, 0, 0, 0])
    # Targets 21 and 22 sit at t = 2, 3 (predicted from inputs 13 and 21). An off-by-one would
    # put the mask on the prompt token 13 or the padding after 22.
    np.testing.assert_array_equal(batch["loss_mask_BT"][0], [0, 0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["logp_infer_BT"][0], [0, 0, -0.5, -1.5, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["versions_BT"][0], [-1, -1, 3, 4, -1, -1, -1, -1])
    # Request.expert_ids[i] is the routing of the forward at input position P + i - 1.
    np.testing.assert_array_equal(batch["expert_ids_BTLK"][0, 2], [[1, 2]])
    np.testing.assert_array_equal(batch["expert_ids_BTLK"][0, 3], [[3, 4]])
    assert np.all(batch["expert_ids_BTLK"][0, [0, 1, 4, 5, 6, 7]] == -1)
    np.testing.assert_array_equal(batch["loss_mask_BT"][1], [0, 0, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["advantages_B"], [0.5, -0.5, 0, 0])
    np.testing.assert_array_equal(batch["rewards_B"], [1, 0, 0, 0])
    np.testing.assert_array_equal(batch["group_ids_B"], [9, 9, -1, -1])
    np.testing.assert_array_equal(batch["sample_index_B"], [0, 1, -1, -1])
    assert not batch["loss_mask_BT"][2:].any()  # padding rows of a partial batch train nothing
    assert {k: v.dtype for k, v in batch.items()} == {
        "tokens_BT": np.int32, "targets_BT": np.int32, "loss_mask_BT": np.float32,
        "logp_infer_BT": np.float32, "versions_BT": np.int32, "advantages_B": np.float32,
        "rewards_B": np.float32, "group_ids_B": np.int32, "sample_index_B": np.int32,
        "expert_ids_BTLK": np.int32}


def test_overlong_row_is_an_error():
    config = SchedulerConfig(mode="sync", group_size=1, batch_size=1, max_seq_len=4)
    r = _finished_request("a", [1, 2, 3], [4, 5], [0, 0], [0, 0])
    group = Group(0, {}, 0, [r], [0.0], [0], np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="exceed max_seq_len=4"):
        build_batch([group], config)


def test_state_encoding_round_trip():
    tree = {"a": [1, 2.5, None, True, "x", (3, 4)],
            "arrays": [np.arange(6, dtype=np.int32).reshape(2, 3), np.zeros((0,), np.float32),
                       np.array([1.5, -2.0], np.float32), np.array([7], np.int32)],
            "nested": {"b": np.int64(5), "c": np.array([[True, False]])}}
    flat = state_lib.encode(tree)
    assert all(isinstance(v, np.ndarray) for v in flat.values())
    # One data array per dtype, not one per stored array.
    assert sorted(flat) == ["data_bool", "data_float32", "data_int32", "meta_json"]
    out = state_lib.decode(flat)
    assert out["a"] == [1, 2.5, None, True, "x", (3, 4)]
    assert out["nested"]["b"] == 5
    for x, y in zip(tree["arrays"], out["arrays"]):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(out["nested"]["c"], [[True, False]])
    with pytest.raises(TypeError, match="cannot store a object"):
        state_lib.encode({"bad": object()})
