"""Typed values from YAML and the command line: check (and gently convert) a value to a dataclass field's type,
naming the key on failure."""

from __future__ import annotations

import types
import typing
from typing import Any

from .registry import ConfigError


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class Raw(str):
    """A command-line value: its text, plus what YAML makes of it (``no`` stays 'no' for a str field)."""

    def __new__(cls, text: str, parsed: Any):
        obj = super().__new__(cls, text)
        obj.parsed = parsed
        return obj


def coerce(value: Any, tp, key: str) -> Any:
    """Check (and gently convert) ``value`` to the annotated type ``tp``; raise naming ``key`` otherwise."""
    if isinstance(value, Raw):
        if tp is str:
            return str(value)
        if typing.get_origin(tp) not in (typing.Union, types.UnionType):
            value = value.parsed
    origin = typing.get_origin(tp)
    if tp is Any or tp is typing.Any or tp is None:
        return value.parsed if isinstance(value, Raw) else value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        items = [coerce(v, args[0], f"{key}[{i}]") if args else v for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        args = typing.get_args(tp)
        if len(args) == 2:
            return {coerce(k, args[0], key): coerce(v, args[1], f"{key}[{k!r}]") for k, v in value.items()}
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected bool (true/false)")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r}: expected float")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected int")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected str")
    return value


def type_hints(obj) -> dict[str, Any]:
    target = obj.__init__ if isinstance(obj, type) else obj
    try:
        return typing.get_type_hints(target)
    except Exception:
        return {}
