"""The exception hierarchy: one root, each error says what went wrong and how to fix it."""

from __future__ import annotations

from pathlib import Path

# ragzip is installed from a checkout (it is on no package registry): an extra is installed from that folder.
_CHECKOUT = Path(__file__).resolve().parents[1]


def extra_hint(extra: str) -> str:
    """The command that installs one of ragzip's extras here: from the checkout this copy runs from when there is
    one (an editable install). Never by name: "ragzip" on a registry is not this project."""
    where = str(_CHECKOUT) if (_CHECKOUT / "pyproject.toml").exists() else "/path/to/your/ragzip/checkout"
    return f"pip install '{where}[{extra}]'"


class RagzipError(Exception):
    """Root of every error ragzip raises on purpose."""


class ConfigError(RagzipError, ValueError):
    """A setting, option or argument is invalid."""


class BudgetError(ConfigError):
    """A budget is malformed or cannot be met."""


class ModelNotFoundError(RagzipError, FileNotFoundError):
    """A model name or path could not be resolved to weights on this machine."""


class UnsupportedModelError(RagzipError):
    """The model loads but a feature cannot run on it correctly."""


class CodecError(RagzipError):
    """Encoded bytes are corrupt, truncated, foreign or of an unknown format."""


class InputError(RagzipError, ValueError):
    """An input record (JSONL line, request body) does not follow the contract."""
