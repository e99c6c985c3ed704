"""``mesh.engine`` (`multihost.EngineMeshConfig`): each invalid value fails with a one-line
message naming the dotted field and what it may be, before anything compiles; the training
mesh leaves a disaggregated engine its devices."""
import pytest

from ring_jax.config import ConfigError
from ring_jax.train import experiment
from ring_jax.train.multihost import EngineMeshConfig


def _build(**engine):
    """The config's ``mesh`` section with these ``mesh.engine`` values."""
    return experiment.build(experiment.MeshConfig, {"engine": engine}, "mesh.")


INVALID = [
    ({"layout": "pod"}, "mesh.engine.layout='pod' is invalid: must be one of ('per_host', "
                        "'global')"),
    ({"placement": "split"}, "mesh.engine.placement='split' is invalid: must be one of "
                             "('colocated', 'disaggregated')"),
    ({"layout": "global", "placement": "disaggregated"},
     "mesh.engine.num_devices=0 is invalid: must be >= 1 with placement='disaggregated'"),
    ({"placement": "disaggregated", "num_devices": 4},
     "mesh.engine.layout='per_host' is invalid: must be 'global' with "
     "placement='disaggregated'"),
    ({"layout": "global", "num_devices": 4},
     "mesh.engine.num_devices=4 is invalid: must be 0 with placement='colocated'"),
    ({"expert": 4}, "mesh.engine.layout='per_host' is invalid: must be 'global' to give the "
                    "engine mesh its own axis sizes"),
    ({"layout": "global", "expert": -2}, "mesh.engine.expert=-2 is invalid"),
    ({"layout": "global", "expert": -1, "data": -1}, "at most one axis may be -1"),
    ({"layout": "global", "tensor": "2"}, "mesh.engine.tensor='2' is invalid"),
]


@pytest.mark.parametrize("engine,message", INVALID, ids=[str(e) for e, _ in INVALID])
def test_invalid_engine_mesh_names_the_field(engine, message):
    with pytest.raises(ConfigError) as e:
        _build(**engine)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_defaults_keep_todays_layout():
    cfg = _build()
    assert cfg.engine == EngineMeshConfig()
    assert (cfg.engine.layout, cfg.engine.placement) == ("per_host", "colocated")
    assert cfg.resolve(8) == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}


def test_disaggregated_trainer_takes_the_devices_the_engine_leaves():
    cfg = _build(layout="global", placement="disaggregated", num_devices=2, expert=2)
    assert cfg.resolve(8) == {"data": 6, "fsdp": 1, "expert": 1, "tensor": 1}
    assert cfg.engine.resolve(2) == {"data": 1, "fsdp": 1, "expert": 2, "tensor": 1}
    with pytest.raises(ConfigError, match="mesh.engine.num_devices=2 is invalid: must leave"):
        cfg.resolve(2)
    with pytest.raises(ConfigError, match="mesh.engine=.*multiply to the engine's 4 devices"):
        EngineMeshConfig(layout="global", expert=2).resolve(4)
