"""Typed values from YAML/CLI: check a value against a dataclass field's annotation, build a dataclass.

Shared by the config loader and the model families' args (`deepsuite.config.families`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, get_args, get_origin

from deepsuite.config.errors import ConfigError

FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32: torch computes learning rates, epsilons and init stds in float32 and
fails (or overflows to inf) beyond it."""


def suggest(key: str, choices: typing.Iterable[str]) -> str:
    """``; did you mean 'x'?`` for the choice closest to ``key`` (empty when none is close)."""
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def type_name(tp: Any) -> str:
    """A readable name of the annotation ``tp``."""
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (with safe numeric widening) or raise `ConfigError`."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            hint = suggest(str(value), [str(c) for c in choices])
            raise ConfigError(f"{key}={value!r} is not allowed{hint} (choose one of {list(choices)})")
        return value
    if origin in (typing.Union, types.UnionType):
        members = get_args(tp)
        if value is None and type(None) in members:
            return None
        errors = []
        for member in members:
            if member is type(None):
                continue
            try:
                return coerce(value, member, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}={value!r} has the wrong type")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list (write it as [a, b] in YAML)")
        (item_tp,) = get_args(tp) or (Any,)
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}={value!r} must be an integer")
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise ConfigError(f"{key}={value!r} must be an integer") from None
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} must be a number") from None
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}={value!r} must be a string")
        return str(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}={value!r} must be of type {type_name(tp)}")


def build_dataclass(cls: type, values: dict[str, Any], prefix: str, allow_extra: bool = False) -> Any:
    """Build dataclass `cls` from `values`, checking names and types; `prefix` names the section."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}={values!r} must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in names:
            if allow_extra:
                continue
            raise ConfigError(
                f"unknown key '{prefix}.{key}'{suggest(str(key), names)} (valid keys: {', '.join(names)})"
            )
        kwargs[key] = coerce(value, hints[key], f"{prefix}.{key}")
    return cls(**kwargs)
