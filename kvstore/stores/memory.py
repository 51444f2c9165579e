"""In-memory LRU store bounded by bytes (per process)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ragzip.errors import ConfigError
from ragzip.kvstore.codecs import Codec
from ragzip.kvstore.stores.base import ByteStore, _check_key

if TYPE_CHECKING:
    from ragzip.kvstore.record import ChunkRecord


class MemoryStore(ByteStore):
    """An LRU of chunk records holding at most `max_bytes`.

    By default records are kept as they are (no copy, no encoding: the fastest tier); treat what `get` returns
    as read-only. With a `codec`, entries are kept encoded (smaller, and checked like any byte store).

    Args:
        max_bytes: byte budget; the least recently used entries are evicted past it.
        codec: None to keep records, or a codec (name or object) to keep encoded blobs.
    """

    def __init__(self, max_bytes: int = 1 << 30, codec: Codec | str | None = None) -> None:
        if max_bytes <= 0:
            raise ConfigError(f"max_bytes must be positive, got {max_bytes}")
        super().__init__(codec if codec is not None else "raw")
        self.max_bytes = int(max_bytes)
        self.is_encoded = codec is not None
        self._data: OrderedDict[str, ChunkRecord | bytes] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._bytes = 0
        self._lock = threading.RLock()

    def _insert(self, key: str, value: ChunkRecord | bytes, size: int) -> bool:
        with self._lock:
            self._pop(key)
            if size > self.max_bytes:
                return False
            self._data[key] = value
            self._sizes[key] = size
            self._bytes += size
            while self._bytes > self.max_bytes:
                oldest = next(iter(self._data))
                self._pop(oldest)
                self._count("evictions")
            return True

    def _pop(self, key: str) -> bool:
        if key in self._data:
            del self._data[key]
            self._bytes -= self._sizes.pop(key)
            return True
        return False

    # Records mode bypasses encoding entirely.
    def get(self, key: str) -> ChunkRecord | None:
        if self.is_encoded:
            return super().get(key)
        _check_key(key)
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
        if value is None or isinstance(value, bytes):
            self._count("misses")
            return None
        self._count("hits")
        return value

    def put(self, key: str, record: ChunkRecord) -> None:
        if self.is_encoded:
            super().put(key, record)
            return
        _check_key(key)
        if record.key != key:
            raise ConfigError(f"record key {record.key} does not match the key it is stored under ({key})")
        if self._insert(key, record, record.nbytes):
            self._count("puts")

    # --- byte primitives -----------------------------------------------------------------------------------------
    def _read(self, key: str) -> bytes | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                return None
            self._data.move_to_end(key)
        return value if isinstance(value, bytes) else None

    def _write(self, key: str, blob: bytes) -> None:
        self._insert(key, bytes(blob), len(blob))

    def _delete(self, key: str) -> bool:
        with self._lock:
            return self._pop(key)

    def _exists(self, key: str) -> bool:
        with self._lock:
            return key in self._data

    def _keys(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._data))

    def _usage(self) -> tuple[int, int]:
        with self._lock:
            return len(self._data), self._bytes
