"""The engine's slot / KV-cache layout on a mesh (`rollout.layout`), hand-checked on abstract
meshes (no devices needed; the 8-device engine runs in tests/multidevice/test_engine_layout.py)."""
import jax
import pytest

from ring_jax import sharding
from ring_jax.rollout.layout import EngineLayout, engine_layout


def _mesh(data=1, fsdp=1, expert=1, tensor=1):
    return jax.sharding.AbstractMesh((data, fsdp, expert, tensor), sharding.MESH_AXES)


@pytest.mark.parametrize("num_slots, slot_axes, cache_len_axes", [
    # Every batch axis divides: the training rules' layout, nothing on the cache length.
    (512, ("data", "fsdp", "expert"), ()),
    # The case: expert 64 divides 256, fsdp 8 does not fit beside it. A prefix rule
    # (fsdp only) would leave 32 slots' whole cache per chip; here 4 slots, length / 8.
    (256, ("data", "expert"), ("fsdp",)),
    (96, ("data", "fsdp"), ("expert",)),  # 96 = 8 · 12: fsdp only; the length over expert
    (3, ("data",), ("fsdp", "expert")),  # no split axis divides: the cache length over both
])
def test_pod_mesh(num_slots, slot_axes, cache_len_axes):
    layout = engine_layout(_mesh(fsdp=8, expert=64), num_slots, 8192)
    assert layout == EngineLayout(slot_axes, cache_len_axes)


def test_ties_go_to_the_later_axis_and_length_axes_must_divide_max_len():
    mesh = _mesh(data=2, fsdp=4, expert=4)
    # 4 slots: fsdp or expert (both 4) -> expert; data 2 and fsdp 4 then split the length.
    assert engine_layout(mesh, 4, 64) == EngineLayout(("expert",), ("data", "fsdp"))
    # 8 slots: data·fsdp or data·expert -> data·expert.
    assert engine_layout(mesh, 8, 64) == EngineLayout(("data", "expert"), ("fsdp",))
    # A length that neither leftover axis divides stays whole (uneven shards are not used).
    assert engine_layout(mesh, 4, 66) == EngineLayout(("expert",), ("data",))
    assert engine_layout(mesh, 4, 63) == EngineLayout(("expert",), ())


def test_rules_change_only_act_batch_and_cache_len():
    layout = EngineLayout(("data", "expert"), ("fsdp",))
    rules = layout.rules()
    assert dict(rules)["act_batch"] == ("data", "expert")
    assert dict(rules)["cache_len"] == ("fsdp",)
    changed = [(a, b) for a, b in zip(rules, sharding.LOGICAL_RULES) if a != b]
    assert [a[0] for a, _ in changed] == ["act_batch", "cache_len"]
    # A layout that splits the slots over every batch axis is the training rules' own.
    full = engine_layout(_mesh(data=2, expert=4), 8, 48).rules()
    spec = lambda rules: sharding.spec_for(("act_batch", "act_kv_heads", "cache_len", None),
                                           _mesh(data=2, expert=4), rules)
    assert spec(full) == spec(sharding.LOGICAL_RULES)
