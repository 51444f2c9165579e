"""The exception hierarchy: one root, each error says what went wrong and how to fix it."""

from __future__ import annotations


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
