"""Validation helpers shared by ring_jax's frozen config dataclasses.

Every config in the library is a frozen (hashable) dataclass whose ``__post_init__`` validates
its fields with these helpers, so a bad value fails before anything is traced or compiled, with
a message that names the field and what it may be.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable


class ConfigError(ValueError):
    """An invalid configuration value. The message names the field and the allowed values."""


def fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{field}={value!r} is invalid: {allowed}")


def check_one_of(field: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        fail(field, value, f"must be one of {allowed}")


def check_int(field: str, value: Any, *, min_value: int | None = None,
              max_value: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        fail(field, value, "must be an int")
    if min_value is not None and value < min_value:
        fail(field, value, f"must be >= {min_value}")
    if max_value is not None and value > max_value:
        fail(field, value, f"must be <= {max_value}")


def check_float(field: str, value: Any, *, min_value: float | None = None,
                max_value: float | None = None, min_exclusive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(field, value, "must be a number")
    if min_value is not None:
        if min_exclusive and not value > min_value:
            fail(field, value, f"must be > {min_value}")
        if not min_exclusive and not value >= min_value:
            fail(field, value, f"must be >= {min_value}")
    if max_value is not None and not value <= max_value:
        fail(field, value, f"must be <= {max_value}")


def check(condition: bool, field: str, value: Any, allowed: str) -> None:
    """Fails with ``allowed`` as the explanation unless ``condition`` holds."""
    if not condition:
        fail(field, value, allowed)


def nearest(name: str, valid: Iterable[str], n: int = 3) -> list[str]:
    """The valid dotted field names closest to a mistyped one (``rl.icepop.alpha`` ->
    ``rl.loss.alpha``): same last component first, then difflib's closest whole names."""
    valid = sorted(valid)
    leaf = name.rsplit(".", 1)[-1]
    same_leaf = [v for v in valid if v.rsplit(".", 1)[-1] == leaf]
    close = difflib.get_close_matches(name, valid, n=n, cutoff=0.5)
    return list(dict.fromkeys(same_leaf + close))[:n]
