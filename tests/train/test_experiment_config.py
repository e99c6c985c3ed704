"""ConfigDict -> ExperimentConfig validation: each invalid config fails with its own message
naming the dotted field, before anything is traced or compiled."""
import pytest

from ring_jax.config import ConfigError
from ring_jax.train import experiment


@pytest.fixture(scope="module")
def quickstart(experiment_file):
    return experiment_file("quickstart")


def _with(quickstart, overrides: dict) -> dict:
    """The quickstart config with dotted-key overrides."""
    cd = quickstart.get_config().to_dict()
    for dotted, value in overrides.items():
        node = cd
        *path, last = dotted.split(".")
        for key in path:
            node = node[key]
        node[last] = value
    return cd


@pytest.mark.parametrize("arg", ["", "sync", "tis", "none", "kpop", "smoke", "sync,smoke"])
def test_quickstart_variants_validate(quickstart, arg):
    cfg = experiment.from_config_dict(quickstart.get_config(arg))
    assert cfg.model.num_experts > 0  # the quickstart is a real MoE
    assert cfg.scheduler.max_seq_len <= cfg.engine.max_len


INVALID = [
    # (override, expected message fragment)
    ({"rl.loss.alpha": -1.0}, "rl.loss.alpha=-1.0 is invalid: must be >= 0"),
    ({"rl.loss.correction": "icepoop"}, "correction='icepoop' is invalid: must be one of"),
    ({"rl.loss.aggregation": "mean"}, "rl.loss.aggregation='mean' is invalid"),
    ({"rl.loss.alfa": 0.5}, "rl.loss.alfa is not a field of LossConfig"),
    ({"rl.optim.learning_rate": 0.0}, "rl.optim.learning_rate=0.0 is invalid: must be > 0"),
    ({"rl.num_minibatches": 3}, "rl.num_minibatches=3 is invalid: must divide"),
    ({"rl.logp_old_from_update": True, "rl.num_minibatches": 2},
     "rl.logp_old_from_update=True is invalid: True needs rl.num_minibatches=1"),
    ({"rl.donate_state": "yes"}, "rl.donate_state='yes' is invalid: must be a bool"),
    ({"model.preset": "huge"}, "model.preset='huge' is invalid: must be one of"),
    ({"model.n_group": 3}, "model.n_group=3 is invalid: must divide num_experts=8"),
    ({"model.num_kv_heads": 3}, "model.num_kv_heads=3 is invalid: must divide num_heads=4"),
    ({"model.moe_impl": "fast"}, "model.moe_impl='fast' is invalid: must be one of"),
    ({"scheduler.mode": "c3po++"}, "scheduler.mode='c3po++' is invalid: must be one of"),
    ({"scheduler.batch_size": 60}, "scheduler.batch_size=60 is invalid: must be a multiple"),
    ({"scheduler.max_seq_len": 512}, "scheduler.max_seq_len=512 is invalid: must be <= "
                                     "engine.max_len=96"),
    ({"scheduler.sampling.temperature": 0.0}, "scheduler.sampling.temperature=0.0 is invalid"),
    ({"scheduler.sampling.top_p": 1.5}, "scheduler.sampling.top_p=1.5 is invalid"),
    ({"engine.num_slots": 0}, "engine.num_slots=0 is invalid: must be >= 1"),
    ({"engine_moe_impl": "fast"}, "engine_moe_impl='fast' is invalid"),
    ({"precision.dtype": "fp8"}, "precision.dtype='fp8' is invalid: must be one of"),
    ({"task.name": "chess"}, "task.name='chess' is invalid: must be one of"),
    ({"task.kwargs.max_size": 0}, "task.max_size=0 is invalid"),
    ({"task.name": "math"}, "task.kwargs={"),  # the addition kwargs do not fit the math task
    ({"task.kwargs": {"eval_fraction": 1.0}, "task.name": "math"},
     "task.eval_fraction=1.0 is invalid"),
    ({"reward.name": "vibes"}, "reward.name='vibes' is invalid: must be one of"),
    ({"checkpoint.best_mode": "up"}, "checkpoint.best_mode='up' is invalid"),
    ({"mesh.expert": 0}, "mesh.expert=0 is invalid"),
    ({"rl.router_replay": True}, "rl.router_replay=True is invalid: needs "
                                 "engine.record_expert_ids=True"),
    ({"seed": -1}, "seed=-1 is invalid: must be >= 0"),
]


@pytest.mark.parametrize("overrides,message", INVALID, ids=[next(iter(o)) for o, _ in INVALID])
def test_invalid_config_names_the_field(quickstart, overrides, message):
    with pytest.raises(ConfigError) as e:
        experiment.from_config_dict(_with(quickstart, overrides))
    assert message in str(e.value)


def test_mesh_resolve_takes_the_rest():
    assert experiment.MeshConfig(data=-1, expert=2).resolve(8) == {
        "data": 4, "fsdp": 1, "expert": 2, "tensor": 1}
    with pytest.raises(ConfigError, match="mesh.data"):
        experiment.MeshConfig(data=-1, expert=3).resolve(8)


def test_every_field_can_be_overridden_from_the_command_line(quickstart):
    """Config files return `experiment.complete(c)`: every dataclass field is a key, so
    `--config.<section>.<field>=...` works for all of them (ml_collections rejects new keys)."""
    cd = quickstart.get_config()

    def check(cls, node, prefix):
        for f in experiment.dataclasses.fields(cls):
            assert f.name in node, f"{prefix}{f.name} missing from the config file's dict"
            sub = experiment._dataclass_in(experiment.typing.get_type_hints(cls)[f.name])
            if sub is not None:
                check(sub, node[f.name], f"{prefix}{f.name}.")

    check(experiment.ExperimentConfig, cd, "")
