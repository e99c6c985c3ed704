"""`ring_jax.main`'s command line: bad input is one line naming what is wrong (the dotted field
and the nearest valid ones, the config file and its exception), before anything compiles."""
import os

import pytest
from absl import flags

from ring_jax import main as main_lib
from ring_jax.config import ConfigError, nearest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "experiments", "quickstart.py")


def _parse(*args):
    argv = ["ring_jax.main", f"--workdir={ROOT}/unused", *args]
    flag_values = flags.FlagValues()
    main_lib.define_flags(flag_values, sys_argv=argv)
    return main_lib.parse_command_line(argv, flag_values)


def test_overrides_reach_the_validated_config():
    cfg = _parse(f"--config={QUICKSTART}:sync", "--config.rl.loss.alpha=0.25",
                 "--config.scheduler.group_size=4")
    assert cfg.rl.loss.alpha == 0.25 and cfg.scheduler.group_size == 4
    assert cfg.scheduler.mode == "sync"


@pytest.mark.parametrize("args,message", [
    # The issue's case: ml_collections' KeyError("'icepop'") named neither path nor fix.
    (("--config.rl.icepop.alpha=0.5",),
     "--config.rl.icepop.alpha: unknown config field 'rl.icepop.alpha'; nearest valid fields: "
     "rl.loss.alpha"),
    (("--config.rl.loss.alfa=0.5",), "unknown config field 'rl.loss.alfa'; nearest valid "
                                     "fields: rl.loss.alpha"),
    (("--config.nonsense_xyz=1",), "unknown config field 'nonsense_xyz'"),
    (("--config.rl.loss.alpha=2",), "rl.loss.alpha=2.0 is invalid: must be <= 1"),
    (("--config.scheduler.group_size=1", "--config.scheduler.batch_size=8",
      "--config.rl.num_minibatches=1"),
     "scheduler.group_size=1 is invalid: must be >= 2 when rl.num_steps > 0"),
])
def test_bad_override_is_one_line(args, message):
    with pytest.raises(ConfigError) as err:
        _parse(f"--config={QUICKSTART}", *args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_config_file_or_arg_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        _parse(f"--config={QUICKSTART}:no_such_arg")
    assert str(err.value).startswith(f"--config={QUICKSTART}:no_such_arg: ValueError: unknown "
                                     "args ['no_such_arg']")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"No such file or directory.*missing\.py"):
        _parse(f"--config={tmp_path / 'missing.py'}")


def test_malformed_value_stays_an_absl_flag_error():
    with pytest.raises(flags.Error, match="could not convert string to float"):
        _parse(f"--config={QUICKSTART}", "--config.rl.loss.alpha=abc")


def test_group_size_one_is_fine_without_rl():
    """SFT-only runs (rl.num_steps=0) never compute an advantage."""
    cfg = _parse(f"--config={QUICKSTART}", "--config.scheduler.group_size=1",
                 "--config.scheduler.batch_size=8", "--config.rl.num_minibatches=1",
                 "--config.rl.num_steps=0")
    assert cfg.scheduler.group_size == 1


def test_nearest_prefers_the_same_leaf_name():
    valid = ["rl.loss.alpha", "rl.loss.beta", "rl.optim.eps", "seed"]
    assert nearest("rl.icepop.alpha", valid)[0] == "rl.loss.alpha"
    assert nearest("sed", valid) == ["seed"]
    assert nearest("zzzz", valid) == []
