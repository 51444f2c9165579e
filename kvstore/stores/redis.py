"""Redis store: chunk records shared by many replicas.

The size cap is Redis's own (`maxmemory` with `maxmemory-policy allkeys-lru`, as scripts/services.sh sets);
`ttl_s` optionally expires entries. When the server is unreachable, every call is a counted miss, and calls
are skipped for `retry_after_s` so a dead server costs one timeout, not one per chunk.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from ragzip.kvstore.codecs import Codec
from ragzip.kvstore.stores.base import BackendUnavailable, ByteStore


class RedisStore(ByteStore):
    """Chunk records in Redis under `prefix + key`.

    Args:
        url: `redis://host:port/db` (any URL redis-py accepts).
        codec: codec name or object for new entries.
        prefix: key namespace.
        ttl_s: expiry of each entry, None for none.
        timeout_s: socket connect/read timeout.
        retry_after_s: after a failure, skip the server for this long.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", codec: Codec | str = "raw", *,
                 prefix: str = "ragzip:kv:", ttl_s: int | None = None, timeout_s: float = 1.0,
                 retry_after_s: float = 5.0) -> None:
        import redis

        super().__init__(codec)
        self.url = url
        parts = urlsplit(url)  # what messages and logs name: the URL without its password
        self.where = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl() if "@" in parts.netloc else url
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.retry_after_s = retry_after_s
        self._down_until = 0.0
        self._errors: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)
        self._client: Any = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if time.monotonic() < self._down_until:
            raise BackendUnavailable(f"redis at {self.where} was unreachable; retrying after a pause")
        try:
            return getattr(self._client, method)(*args, **kwargs)
        except self._errors as exc:
            self._down_until = time.monotonic() + self.retry_after_s
            raise BackendUnavailable(f"redis at {self.where}: {exc}") from exc

    def _read(self, key: str) -> bytes | None:
        value = self._call("get", self.prefix + key)
        return bytes(value) if value is not None else None

    def _write(self, key: str, blob: bytes) -> None:
        self._call("set", self.prefix + key, blob, ex=self.ttl_s)

    def _delete(self, key: str) -> bool:
        return bool(self._call("delete", self.prefix + key))

    def _exists(self, key: str) -> bool:
        return bool(self._call("exists", self.prefix + key))

    def _names(self) -> list[bytes]:
        # SCAN, not KEYS: it does not block a shared server while it walks a large keyspace.
        names = self._call("scan_iter", match=self.prefix + "*", count=1000)
        try:
            return list(names)
        except self._errors as exc:
            raise BackendUnavailable(f"redis at {self.where}: {exc}") from exc

    def _keys(self) -> Iterator[str]:
        n = len(self.prefix)
        return iter([(k.decode() if isinstance(k, bytes) else k)[n:] for k in self._names()])

    def _usage(self) -> tuple[int, int]:
        names = self._names()
        if not names:
            return 0, 0
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.strlen(name)
        try:
            sizes = pipe.execute()
        except self._errors as exc:
            raise BackendUnavailable(f"redis at {self.where}: {exc}") from exc
        return len(names), sum(int(x or 0) for x in sizes)

    def close(self) -> None:
        self._client.close()
