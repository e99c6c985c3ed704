"""Shared test settings: fp32 matmuls everywhere so parity tolerances are meaningful; the
repository root on ``sys.path`` and the `experiment_file` fixture for experiments/*.py."""
import importlib
import os
import sys

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # experiments/*.py import experiments.common
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def experiment_file():
    """``experiment_file("icepop")``: the module experiments/icepop.py, imported once per session
    as ``experiments.icepop`` (so its dataclasses and absl flags are defined once)."""
    return lambda name: importlib.import_module(f"experiments.{name}")
