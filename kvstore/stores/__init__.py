"""Chunk KV stores: in-memory LRU, local disk, Redis. All implement `ChunkStore`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ragzip.kvstore.stores.base import ChunkStore
    from ragzip.kvstore.stores.disk import DiskStore
    from ragzip.kvstore.stores.memory import MemoryStore
    from ragzip.kvstore.stores.redis import RedisStore

__all__ = ["ChunkStore", "DiskStore", "MemoryStore", "RedisStore", "open_store"]

_LAZY = {
    "ChunkStore": "ragzip.kvstore.stores.base",
    "MemoryStore": "ragzip.kvstore.stores.memory",
    "DiskStore": "ragzip.kvstore.stores.disk",
    "RedisStore": "ragzip.kvstore.stores.redis",
    "open_store": "ragzip.kvstore.stores.base",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ragzip.kvstore.stores' has no attribute {name!r}")
