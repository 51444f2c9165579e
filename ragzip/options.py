"""Options that arrive as strings (CLI `--option k=v`, suite options, HTTP, JSON configs), parsed one way.

A component's options are a frozen dataclass; `parse_options(Options, values, owner=...)` builds it from a mapping of
strings or already typed values, with a clear ConfigError for an unknown key or a bad value. A field's type decides
the parsing (bool, int, float, str, an Enum, `X | None`); `field(metadata=bounds(...))` adds limits, and
`metadata={"parse": fn}` a parser of its own for the odd field.

Example:
    >>> @dataclass(frozen=True)
    ... class Options:
    ...     k: int = field(default=3, metadata=bounds(low=1))
    >>> parse_options(Options, {"k": "5"}, owner="crag")
    Options(k=5)
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from functools import cache
from typing import Any, TypeVar

from ragzip.errors import ConfigError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("", "none", "null")
E = TypeVar("E", bound=Enum)
T = TypeVar("T")


def parse_bool(value: Any, name: str) -> bool:
    """A bool from a bool or a string such as "true"/"0"; anything else is a ConfigError naming the option."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean (true/false)")


def parse_enum(enum: type[E], value: Any, name: str) -> E:
    """An Enum member from itself or its value (case-insensitive for strings)."""
    if isinstance(value, enum):
        return value
    text = str(value.value if isinstance(value, Enum) else value).strip()
    for member in enum:
        if text == str(member.value) or text.lower() == str(member.value).lower():
            return member
    raise ConfigError(f"unknown {name} {value!r}; valid: {[m.value for m in enum]}")


def parse_int(value: Any, name: str, *, low: float | None = None, high: float | None = None) -> int:
    """An integer (a float or string only when it is a whole number), within [low, high]."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not an integer")
    try:
        number = float(value) if not isinstance(value, int) else value
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not an integer") from None
    if isinstance(number, float) and (not math.isfinite(number) or number != int(number)):
        raise ConfigError(f"{name}={value!r} is not an integer")
    return _check(int(number), name, low, high)


def parse_float(value: Any, name: str, *, low: float | None = None, high: float | None = None) -> float:
    """A finite number within [low, high]."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name}={value!r} is not a finite number")
    return _check(number, name, low, high)


def _check(number: T, name: str, low: float | None, high: float | None) -> T:
    if (low is not None and number < low) or (high is not None and number > high):  # type: ignore[operator]
        span = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ConfigError(f"{name}={number!r} is out of range {span}")
    return number


def bounds(*, low: float | None = None, high: float | None = None) -> dict[str, Any]:
    """Field metadata: the closed range a number must lie in."""
    return {"low": low, "high": high}


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _parse_value(tp: Any, value: Any, name: str, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)) and (value is None or (isinstance(value, str) and
                                                                       value.strip().lower() in _NONE)):
            return None
        if len(args) == 1:
            return _parse_value(args[0], value, name, meta)
        raise TypeError(f"option {name}: give union types other than `X | None` a 'parse' function")
    if tp is bool:
        return parse_bool(value, name)
    if tp is int:
        return parse_int(value, name, low=meta.get("low"), high=meta.get("high"))
    if tp is float:
        return parse_float(value, name, low=meta.get("low"), high=meta.get("high"))
    if tp is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r} must be a string")
        return value
    if isinstance(tp, type) and issubclass(tp, Enum):
        return parse_enum(tp, value, name)
    return value  # other types (objects handed over in Python) pass as they are


def parse_options(cls: type[T], values: Mapping[str, Any] | T | None = None, *, owner: str) -> T:
    """Build the options dataclass `cls` from `values` (strings or typed values); an instance passes through.

    Raises:
        ConfigError: an unknown key (the message lists the valid ones) or a value that does not parse.
    """
    if isinstance(values, cls):
        return values
    values = dict(values or {})  # type: ignore[arg-type]
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    refuse_unknown(values, fields, owner)
    hints = _hints(cls)
    parsed = {}
    for key, value in values.items():
        if value is None and not _optional(hints[key]):
            continue  # None means "the default" for a field that cannot be None
        meta = fields[key].metadata
        custom: Callable[[Any, str], Any] | None = meta.get("parse")
        name = f"{owner} option {key}"
        parsed[key] = custom(value, name) if custom is not None else _parse_value(hints[key], value, name, meta)
    return cls(**parsed)


__all__ = ["bounds", "parse_bool", "parse_enum", "parse_float", "parse_int", "parse_options"]


def refuse_unknown(values: Iterable[str], known: Iterable[str], owner: str) -> None:
    """ConfigError listing the valid keys when `values` has a key outside `known` (never silently ignored)."""
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {owner}; valid: {sorted(set(known))}")
