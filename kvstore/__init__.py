"""Chunk KV reuse: records, stores (memory, disk, Redis), codecs (raw, int8/int4, CacheGen) and the loader.

Import-light on purpose: the names below are loaded on first use.

Example:
    >>> from ragzip.kvstore import DiskStore, get_or_compute
    >>> store = DiskStore("/var/cache/ragzip-kv", max_bytes=2 << 30)
    >>> record, hit = get_or_compute(store, model, token_ids)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ragzip.kvstore.loader import get_or_compute
    from ragzip.kvstore.record import ChunkRecord
    from ragzip.kvstore.stores import ChunkStore, DiskStore, MemoryStore, RedisStore

__all__ = ["ChunkRecord", "ChunkStore", "DiskStore", "MemoryStore", "RedisStore", "get_or_compute"]

_LAZY = {
    "ChunkRecord": "ragzip.kvstore.record",
    "ChunkStore": "ragzip.kvstore.stores.base",
    "MemoryStore": "ragzip.kvstore.stores.memory",
    "DiskStore": "ragzip.kvstore.stores.disk",
    "RedisStore": "ragzip.kvstore.stores.redis",
    "get_or_compute": "ragzip.kvstore.loader",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ragzip.kvstore' has no attribute {name!r}")
