"""Registries of named functions with typed hyper-parameters (corrections, advantage estimators).

A fork adds a mismatch correction or an advantage estimator as one registered function that
declares the hyper-parameters it reads, each with a type and optionally a default and a range:

    @losses.register_correction("abs_log_k_mask", params={"tau": Param(float, 0.3, min_value=0.0)})
    def abs_log_k_mask(x, cfg):
        keep_BT = jnp.abs(x.log_k_BT) <= cfg.param("tau")
        ...

Shorthand in ``params``: a bare type (``{"tau": float}``) is a required parameter, a bare value
(``{"tau": 0.3}``) one with that default and its type. The config that selects the function
(`LossConfig.correction_params`, `AdvantageConfig.estimator_params`) is checked against the
declaration when it is built, before anything compiles: an unknown, missing or mistyped
parameter fails with one `ConfigError` line naming the dotted field
(``rl.loss.correction_params.tau='x' is invalid: must be a float``), and the defaults are
filled in, so the stored config (config.json) is the complete record of the run.

A name may also be ``"module.path:function"``: the module is imported (its ``@register_...``
decorators run) and the function is used under its registration, or, if undecorated, as a
function with no parameters. A fork can then live in its own module, outside ring_jax, and be
selected from the command line (``--config.rl.loss.correction=my_pkg.masks:abs_log_k_mask``).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, NamedTuple

from ring_jax import config as config_lib

PARAM_TYPES = (bool, int, float, str)
_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Param:
    """A declared hyper-parameter: its type (bool, int, float or str), a default (none: it is
    required), an allowed range for numbers, and allowed values."""

    type: type
    default: Any = _REQUIRED
    min_value: float | None = None
    max_value: float | None = None
    choices: tuple[Any, ...] = ()

    def __post_init__(self):
        if self.type not in PARAM_TYPES:
            raise TypeError(f"Param type {self.type!r}: must be one of {PARAM_TYPES}")
        if self.default is not _REQUIRED:
            # A bad default is the declaring module's bug: raise at registration time.
            self.check("default", self.default)

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def check(self, field: str, value: Any) -> Any:
        """``value`` as this parameter's type (an int is a valid float); `ConfigError` naming
        ``field`` otherwise."""
        name = self.type.__name__
        if self.type is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, self.type) and (self.type is bool
                                                   or not isinstance(value, bool))
        config_lib.check(ok, field, value, f"must be {'an' if name == 'int' else 'a'} {name}")
        if self.min_value is not None:
            config_lib.check(value >= self.min_value, field, value,
                             f"must be >= {self.min_value}")
        if self.max_value is not None:
            config_lib.check(value <= self.max_value, field, value,
                             f"must be <= {self.max_value}")
        if self.choices:
            config_lib.check_one_of(field, value, self.choices)
        return value


def as_param(spec: Any) -> Param:
    """A `Param` from the shorthand of the module docstring (a Param, a bare type, a default)."""
    if isinstance(spec, Param):
        return spec
    if isinstance(spec, type):
        return Param(spec)
    return Param(type(spec), spec)


class Entry(NamedTuple):
    """A registered function and the parameters it declared."""

    fn: Callable
    params: dict[str, Param]


class Registry:
    """Functions by name, each with its declared `Param`s. ``kind`` ("correction") names the
    thing in messages; ``field`` is the config field that holds the name."""

    def __init__(self, kind: str, field: str):
        self.kind, self.field = kind, field
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, params: Mapping[str, Any] | None = None
                 ) -> Callable[[Callable], Callable]:
        """Decorator: registers ``fn`` as ``name`` with ``params`` (see the module docstring)."""
        declared = {key: as_param(spec) for key, spec in (params or {}).items()}

        def register(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            if ":" in name:
                raise ValueError(f"{self.kind} name {name!r}: ':' is reserved for "
                                 "'module:function' names")
            self._entries[name] = Entry(fn, declared)
            return fn

        return register

    def names(self) -> tuple[str, ...]:
        """Registered names (not the ``module:function`` aliases met so far)."""
        return tuple(name for name in self._entries if ":" not in name)

    def get(self, name: str) -> Entry:
        """The entry of a registered or ``module:function`` name; `ConfigError` naming the
        field otherwise."""
        if name not in self._entries and isinstance(name, str) and ":" in name:
            module, _, attr = name.partition(":")
            try:
                fn = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                config_lib.fail(self.field, name, f"cannot import it: {e}")
            registered = [e for e in self._entries.values() if e.fn is fn]
            self._entries[name] = registered[0] if registered else Entry(fn, {})
        if name not in self._entries:
            config_lib.fail(self.field, name,
                            f"must be one of {self.names()} or 'module.path:function'")
        return self._entries[name]

    def resolve_params(self, name: str, given: Any, field: str
                       ) -> tuple[tuple[str, Any], ...]:
        """The parameters of ``name`` as sorted (key, value) pairs, checked against its
        declaration, with defaults filled in. ``given``: such pairs or a mapping; ``field``: the
        config field that holds them (named in errors as ``field.key``)."""
        return resolve_params(self.get(name).params, given, field, f"{self.kind} {name!r}")


def resolve_params(declared: Mapping[str, Any], given: Any, field: str, owner: str
                   ) -> tuple[tuple[str, Any], ...]:
    """``given`` (a mapping or (key, value) pairs held by the config field ``field``) checked
    against ``declared`` ({key: Param or shorthand} of ``owner``, e.g. "policy 'paced'"): sorted
    (key, value) pairs with the defaults filled in; one `ConfigError` line naming
    ``field.key`` for an unknown, missing or mistyped parameter."""
    declared = {key: as_param(spec) for key, spec in declared.items()}
    if isinstance(given, Mapping):
        given = tuple(given.items())
    config_lib.check(
        isinstance(given, tuple) and all(isinstance(p, tuple) and len(p) == 2
                                         and isinstance(p[0], str) for p in given),
        field, given, "must be a mapping of parameter names to values")
    values = dict(given)
    for key in values:
        if key not in declared:
            raise config_lib.ConfigError(
                f"{field}.{key} is not a parameter of {owner}; its "
                f"parameters: {sorted(declared) or 'none'}")
    resolved = {}
    for key, param in declared.items():
        if key in values:
            resolved[key] = param.check(f"{field}.{key}", values[key])
        elif param.required:
            raise config_lib.ConfigError(
                f"{field}.{key} is missing: {owner} needs it ({param.type.__name__})")
        else:
            resolved[key] = param.default
    return tuple(sorted(resolved.items()))


def param_value(params: tuple[tuple[str, Any], ...], key: str, kind: str, name: str) -> Any:
    """``key``'s value in resolved ``params`` (of the function ``name``, a ``kind``)."""
    for k, value in params:
        if k == key:
            return value
    raise config_lib.ConfigError(
        f"{kind} {name!r} reads parameter {key!r} without declaring it "
        f"(declare it: register_{kind.split()[-1]}(..., params={{{key!r}: ...}}))")
