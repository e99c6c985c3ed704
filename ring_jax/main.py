"""Entry point: ``python -m ring_jax.main --config=experiments/<study>.py:<arg> --workdir=DIR``.

The config file's ``get_config(arg)`` returns an `ml_collections.ConfigDict`; any field can be
overridden on the command line (``--config.rl.loss.alpha=0.3``). It is validated into frozen
dataclasses (`ring_jax.train.experiment`) before anything compiles, so a bad value fails at once
with the field's dotted name; so does a command line that names a field that does not exist
(one line with the nearest valid fields, not ml_collections' traceback) or a config file
whose ``get_config`` rejects its argument. A ``--workdir`` holding a checkpoint resumes; every
run writes ``config.json``, ``metrics.jsonl``, TensorBoard events and checkpoints there.
``--validate_only`` stops after validation and prints the config (what
`tests/test_docs_commands.py` runs for every command line in the docs and launchers).

Exit codes: 0 done (or already finished); 75 stopped by SIGTERM after saving a checkpoint
(`ring_jax.train.preemption`: rerun to resume); 1 with a one-line message for an invalid
config, a config change that a resume refuses, no intact checkpoint, a full disk, or a loss
that stayed non-finite (BUILD.md, "Failure behaviour").
"""
from __future__ import annotations

import re
import sys
from typing import Any, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from ring_jax import config as config_lib
from ring_jax.config import ConfigError
from ring_jax.train import experiment


def define_flags(flag_values: flags.FlagValues, sys_argv: Sequence[str] | None = None) -> None:
    """--config, --workdir, --validate_only in `flag_values`; `sys_argv` (default sys.argv) is
    where ml_collections looks for the ``--config.<field>`` overrides."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file (with :arg).",
                                    flag_values=flag_values, lock_config=True,
                                    sys_argv=None if sys_argv is None else list(sys_argv))
    flags.DEFINE_string("workdir", None, "Run directory (resumes if it has a checkpoint).",
                        flag_values=flag_values)
    flags.DEFINE_bool("validate_only", False, "Validate the config, print it and exit.",
                      flag_values=flag_values)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


def parse_command_line(argv: Sequence[str], flag_values: flags.FlagValues
                       ) -> experiment.ExperimentConfig:
    """Parses `argv` (argv[0] is the program) into `flag_values` and validates the config.

    Raises ConfigError with one line for a bad config file argument, an unknown
    ``--config.<field>`` or an invalid value; absl's own flag errors (a malformed value) stay
    `flags.Error`.
    """
    _parse_into(argv, flag_values)
    return experiment.from_config_dict(flag_values.config)


def _parse_into(argv: Sequence[str], flag_values: flags.FlagValues) -> list[str]:
    try:
        rest = flag_values(list(argv))
        flag_values.config.to_dict()  # ml_collections defers a missing file's error to first use
        return rest
    except flags.Error as e:
        if not str(e).startswith("flag --config="):  # not about the config: absl's message
            raise
        raise ConfigError(_explain_config_failure(argv, e)) from None
    except Exception as e:  # raised while loading the config file or applying an override
        raise ConfigError(_explain_config_failure(argv, e)) from None


def _config_spec(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if (m := re.fullmatch(r"--?config=(.*)", arg)):
            return m.group(1)
        if re.fullmatch(r"--?config", arg) and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _dotted_fields(tree: Any, prefix: str = "") -> set[str]:
    """Every dotted path of a nested dict (sections and leaves)."""
    out = set()
    for key, value in tree.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= _dotted_fields(value, f"{prefix}{key}.")
    return out


def _explain_config_failure(argv: Sequence[str], error: Exception) -> str:
    """One line for an exception raised while ml_collections loaded or overrode the config."""
    spec = _config_spec(argv)
    if spec is None:
        return f"{type(error).__name__}: {error}"
    try:
        loaded = config_flags.config_flags.ConfigFileFlagParser(name="config").parse(spec)
        valid = _dotted_fields(loaded.to_dict() if hasattr(loaded, "to_dict") else dict(loaded))
    except Exception as e:  # the config file itself (missing, or get_config rejects its arg)
        return f"--config={spec}: {_last_line(e)}"
    for arg in argv:
        if (m := re.match(r"--?(?:no)?config\.([^=]+)", arg)) and m.group(1) not in valid:
            field = m.group(1)
            hint = config_lib.nearest(field, valid)
            return (f"--config.{field}: unknown config field {field!r}"
                    + (f"; nearest valid fields: {', '.join(hint)}" if hint else ""))
    return f"--config={spec}: {_last_line(error)}"


def _last_line(error: Exception) -> str:
    """ml_collections wraps a config file's exception with its whole traceback: the last line
    is the exception itself."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flags parser for `app.run`, with config errors as one line and exit status 1."""
    try:
        return _parse_into(argv, flags.FLAGS)
    except flags.Error as e:
        sys.exit(f"invalid command line: {e}\nPass --helpfull to see the flags.")
    except ConfigError as e:
        sys.exit(f"invalid config: {e}")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        cfg = experiment.derive(experiment.from_config_dict(flags.FLAGS.config))
    except ConfigError as e:
        sys.exit(f"invalid config: {e}")
    if flags.FLAGS.validate_only:
        print(cfg)
        return
    from ring_jax.train import rl_loop  # imported after validation: it pulls in JAX programs
    from ring_jax.train import checkpoint, health
    try:
        rl_loop.run(cfg, flags.FLAGS.workdir)
    except ConfigError as e:
        sys.exit(f"invalid config: {e}")
    except (checkpoint.CheckpointError, health.NonFiniteError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(main, flags_parser=_parse_flags)
