"""KV codecs: turn a chunk's per-layer K/V into bytes and back.

`get_codec("raw" | "int8" | "int4" | "cachegen" | "kvtc", **options)` builds one; a codec's `encode` returns a small
JSON-able meta dict (stored in the blob header) and the payload bytes, and `decode` inverts it. Codecs never
pickle: payloads are raw little-endian arrays or entropy-coded words.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ragzip.errors import CodecError, ConfigError

if TYPE_CHECKING:
    import torch

    from ragzip.kvstore.record import LayerKV

Shape = tuple[int, int, int]

CODECS: dict[str, str] = {
    "raw": "ragzip.kvstore.codecs.raw:RawCodec",
    "int8": "ragzip.kvstore.codecs.quant:Int8Codec",
    "int4": "ragzip.kvstore.codecs.quant:Int4Codec",
    "cachegen": "ragzip.kvstore.codecs.cachegen:CacheGenCodec",
    "kvtc": "ragzip.kvstore.codecs.kvtc:KVTCCodec",
}


class Codec(Protocol):
    """Encode and decode the K/V layers of one chunk."""

    name: str
    version: int

    def encode(self, layers: Sequence[LayerKV], *, start: int = 0) -> tuple[dict[str, Any], bytes]:
        """Return (meta, payload); meta must be JSON-able and small. `start`: the chunk's first position."""
        ...

    def decode(self, meta: dict[str, Any], payload: bytes, shapes: Sequence[tuple[Shape, Shape]],
               dtype: torch.dtype) -> list[LayerKV]:
        """Rebuild the layers (`shapes[i] = (K shape, V shape)`) in `dtype`; raise CodecError on bad input."""
        ...


class MissingProfileError(CodecError):
    """A blob needs codec state this process lacks (e.g. a KVTC profile): a configuration problem, not corruption,
    so stores count a miss and keep the entry."""


def codec_class(name: str) -> Any:
    """The class registered under `name`."""
    try:
        target = CODECS[name]
    except KeyError:
        raise ConfigError(f"unknown KV codec {name!r}; valid: {sorted(CODECS)}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def get_codec(name: str, **options: Any) -> Codec:
    """Build a codec by name. `"kvtc:2"` is short for `get_codec("kvtc", level=2)`.

    Raises:
        ConfigError: unknown name or options.
    """
    base, _, level = name.partition(":")
    if level:
        options.setdefault("level", level)
    cls = codec_class(base)
    try:
        return cls(**options)  # type: ignore[no-any-return]
    except TypeError as exc:
        raise ConfigError(f"bad options for KV codec {base!r}: {exc}") from None
