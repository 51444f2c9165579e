"""Parsing of option values that arrive as strings (CLI `--option k=v`, suite options, HTTP)."""

from __future__ import annotations

from typing import Any

from ragzip.errors import ConfigError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


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
