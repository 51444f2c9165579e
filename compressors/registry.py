"""Compressor registry: the explicit name -> class table, looked up strictly.

Every compressor module is import-light (torch and the models load on first use), so the table names the classes
themselves. Each is built as `cls(counter=TokenCounter, **options)`; its options are a frozen dataclass
(`cls.Options`) parsed by `ragzip.options`.
"""

from __future__ import annotations

from typing import Any

from ragzip.compressors.base import BaseCompressor, Compressor
from ragzip.compressors.baselines import EmbedTopKCompressor, IdentityCompressor, RandomCompressor, TruncateCompressor
from ragzip.compressors.crag import CragCompressor
from ragzip.compressors.exit import ExitCompressor
from ragzip.compressors.lingua2 import Lingua2Compressor
from ragzip.errors import ConfigError
from ragzip.tokens import TokenCounter, get_token_counter

COMPRESSORS: dict[str, type[BaseCompressor]] = {
    cls.name: cls
    for cls in (IdentityCompressor, TruncateCompressor, RandomCompressor, EmbedTopKCompressor, ExitCompressor,
                Lingua2Compressor, CragCompressor)
}


def available() -> list[str]:
    return sorted(COMPRESSORS)


def canonical_method(method: str) -> str:
    """A method name as registered: stage names trimmed and lower-cased ("EXIT + LinGua2" -> "exit+lingua2").
    A pipeline config file's path is left as it is."""
    if method.endswith(".json"):
        return method
    return "+".join(part.strip().lower() for part in method.split("+"))


def get_compressor(name: str, *, counter: TokenCounter | None = None, **options: Any) -> Compressor:
    """Build the compressor registered as `name` with `options`.

    Raises:
        ConfigError: unknown name, or options the compressor does not accept.
    """
    try:
        cls = COMPRESSORS[canonical_method(name)]
    except KeyError:
        raise ConfigError(f"unknown compressor {name!r}; valid: {available()}") from None
    try:
        return cls(counter=counter or get_token_counter(None), **options)
    except TypeError as exc:  # an argument the constructor itself does not take (not an option)
        raise ConfigError(f"invalid options for compressor {name!r}: {exc}") from exc
