"""Multi-device tests run in their own process with 8 fake CPU devices (see tests/run.sh).

XLA_FLAGS must be set before JAX initialises its backend; it is set here as well so that
`pytest tests/multidevice` works on its own.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    del config
    if jax.device_count() < 8:
        skip = pytest.mark.skip(reason="needs 8 devices: run via tests/run.sh (own process)")
        for item in items:
            item.add_marker(skip)
