"""Entry point: ``python -m ring_jax.main --config=experiments/<study>.py:<arg> --workdir=DIR``.

The config file's ``get_config(arg)`` returns an `ml_collections.ConfigDict`; any field can be
overridden on the command line (``--config.rl.loss.alpha=0.3``). It is validated into frozen
dataclasses (`ring_jax.train.experiment`) before anything compiles, so a bad value fails at once
with the field's dotted name. A ``--workdir`` holding a checkpoint resumes; every run writes
``config.json``, ``metrics.jsonl``, TensorBoard events and checkpoints there.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ring_jax.config import ConfigError
from ring_jax.train import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (with :arg).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumes if it has a checkpoint).")
_VALIDATE_ONLY = flags.DEFINE_bool("validate_only", False,
                                  "Validate the config, print it and exit.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        cfg = experiment.derive(experiment.from_config_dict(_CONFIG.value))
    except ConfigError as e:
        sys.exit(f"invalid config: {e}")
    if _VALIDATE_ONLY.value:
        print(cfg)
        return
    from ring_jax.train import rl_loop  # imported after validation: it pulls in JAX programs
    rl_loop.run(cfg, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
