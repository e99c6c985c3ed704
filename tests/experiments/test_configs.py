"""Every study config under experiments/: a strict arg (an unknown one fails, before anything is
built), and the shared base of experiments/common.py."""
from __future__ import annotations

import dataclasses
import glob
import os

import pytest

from ring_jax.train import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Every experiments/*.py that defines get_config(arg): a new config file is covered on its own.
CONFIG_FILES = sorted(
    os.path.basename(path)[:-3] for path in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
    if "\ndef get_config(" in open(path).read())


def test_the_study_configs_are_found():
    assert {"quickstart", "icepop", "c3po", "mismatch_anatomy"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("name", CONFIG_FILES)
@pytest.mark.parametrize("bad_arg", ["tsi", "smoke,bogus", "bogus=1"])
def test_an_unknown_arg_fails(experiment_file, name, bad_arg):
    with pytest.raises(ValueError, match="unknown args"):
        experiment_file(name).get_config(bad_arg)


def test_quickstart_takes_one_correction(experiment_file):
    quickstart = experiment_file("quickstart")
    assert experiment.from_config_dict(quickstart.get_config("tis")).rl.loss.correction == "tis"
    assert experiment.from_config_dict(quickstart.get_config("")).rl.loss.correction == "icepop"
    with pytest.raises(ValueError, match="at most one correction"):
        quickstart.get_config("tis,kpop")


def test_mismatch_anatomy_takes_one_size(experiment_file):
    ma = experiment_file("mismatch_anatomy")
    assert ma.get_config("tiny").num_prompts < ma.get_config("local").num_prompts
    with pytest.raises(ValueError, match="choose one size"):
        ma.get_config("local,tiny")


@pytest.mark.parametrize("name", ["quickstart", "icepop", "c3po"])
def test_studies_start_from_the_common_base(experiment_file, name):
    """The fields a study does not set are the base's, and ``smoke`` is the common shrink."""
    common = experiment_file("common")
    base = experiment.from_config_dict(experiment.complete(common.base_config()))
    cfg = experiment.from_config_dict(experiment_file(name).get_config(""))
    if name == "icepop":  # the mismatch study's trainer is dropless (capacity factor E/K)
        assert cfg.model.capacity_factor == 4.0
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, capacity_factor=base.model.capacity_factor))
    assert (cfg.model, cfg.sft_optim, cfg.rl.advantage, cfg.reward, cfg.mesh) == (
        base.model, base.sft_optim, base.rl.advantage, base.reward, base.mesh)
    smoke = experiment.from_config_dict(experiment_file(name).get_config("smoke"))
    assert (smoke.sft.num_steps, smoke.rl.num_steps, smoke.rl.num_minibatches) == (4, 3, 1)
    assert (smoke.scheduler.group_size, smoke.scheduler.batch_size) == (4, 8)
    assert (smoke.eval.every, smoke.eval.num_prompts, smoke.checkpoint.save_every) == (2, 4, 1)
