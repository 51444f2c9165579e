"""Compressor registry: explicit name -> factory table, looked up strictly.

Factories are "module:attribute" strings so that heavy modules load only when used. Every factory is called
as `factory(counter=TokenCounter, **options)`.
"""

from __future__ import annotations

import importlib
from typing import Any

from ragzip.errors import ConfigError
from ragzip.tokens import TokenCounter, get_token_counter

COMPRESSORS: dict[str, str] = {
    "none": "ragzip.compressors.baselines:IdentityCompressor",
    "truncate": "ragzip.compressors.baselines:TruncateCompressor",
    "random": "ragzip.compressors.baselines:RandomCompressor",
    "embed-topk": "ragzip.compressors.baselines:EmbedTopKCompressor",
    "exit": "ragzip.compressors.exit:ExitCompressor",
    "lingua2": "ragzip.compressors.lingua2:Lingua2Compressor",
    "crag": "ragzip.compressors.crag:CragCompressor",
}


def available() -> list[str]:
    return sorted(COMPRESSORS)


def get_compressor(name: str, *, counter: TokenCounter | None = None, **options: Any) -> Any:
    """Build the compressor registered as `name` with `options`.

    Raises:
        ConfigError: unknown name, or options the compressor does not accept.
    """
    try:
        target = COMPRESSORS[name]
    except KeyError:
        raise ConfigError(f"unknown compressor {name!r}; valid: {available()}") from None
    module_name, attr = target.split(":")
    factory = getattr(importlib.import_module(module_name), attr)
    try:
        return factory(counter=counter or get_token_counter(None), **options)
    except TypeError as exc:
        raise ConfigError(f"invalid options for compressor {name!r}: {exc}") from exc
