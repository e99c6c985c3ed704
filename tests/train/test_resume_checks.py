"""What `rl_loop.run` checks before it builds anything on a rerun: a finished run returns at
once; a config that changes the checkpoints' meaning is refused without touching the workdir."""
import json
import os
import time

import pytest

from ring_jax.config import ConfigError
from ring_jax.train import config_history, experiment, rl_loop



@pytest.fixture
def smoke_config(experiment_file):
    """The quickstart's smoke config, derived as the run records it (`experiment.derive`)."""
    def make(**rl):
        cd = experiment_file("quickstart").get_config("smoke")
        cd.rl.update(rl)
        return experiment.derive(experiment.from_config_dict(cd))
    return make


@pytest.fixture
def finished_run(tmp_path, smoke_config):
    """A workdir as a finished 3-step run leaves it (the checkpoint directories are empty:
    the rerun must not even open them)."""
    cfg = smoke_config()
    for step in (2, 3):
        (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
    config_history.record(str(tmp_path), experiment.to_dict(cfg))
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(4):
            f.write(json.dumps({"step": step, "eval/pass@1": step / 4, "rl/x": 1.0}) + "\n")
    return cfg, tmp_path


def test_rerun_of_finished_run_says_so_at_once(finished_run, capsys):
    cfg, workdir = finished_run
    t0 = time.perf_counter()
    final = rl_loop.run(cfg, str(workdir))
    assert time.perf_counter() - t0 < 5   # no model, engine or SFT work (was ~30 s)
    assert final == {"eval/pass@1": 0.75}   # what the finished run returned
    assert f"{workdir}: already finished at step 3 (rl.num_steps=3)" in capsys.readouterr().out


def test_rerun_with_a_state_change_is_refused_before_anything(finished_run, smoke_config):
    cfg, workdir = finished_run
    before = {n: os.path.getmtime(workdir / n) for n in os.listdir(workdir)}
    changed = smoke_config(num_minibatches=2)
    import dataclasses
    changed = dataclasses.replace(changed, model=dataclasses.replace(changed.model,
                                                                     num_experts_per_tok=1))
    with pytest.raises(ConfigError) as err:
        rl_loop.run(changed, str(workdir))
    assert "model.num_experts_per_tok: 2 -> 1" in str(err.value)
    assert "rl.num_minibatches: 1 -> 2" in str(err.value)
    assert {n: os.path.getmtime(workdir / n) for n in os.listdir(workdir)} == before
