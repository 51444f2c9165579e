"""The ChunkStore protocol and the shared logic of byte-backed stores.

A store never raises on a bad entry or an unreachable backend: `get` returns None (a miss) and the event is
counted in `stats()`, so the caller recomputes the chunk. Bad entries (corrupt, truncated, foreign model) are
evicted when found.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ragzip.errors import CodecError, ConfigError
from ragzip.kvstore.blob import ForeignModelError, decode_record, encode_record, read_header
from ragzip.kvstore.codecs import Codec, MissingProfileError, get_codec
from ragzip.kvstore.key import is_chunk_key

if TYPE_CHECKING:
    from ragzip.kvstore.record import ChunkRecord

log = logging.getLogger(__name__)

STAT_FIELDS = ("hits", "misses", "puts", "evictions", "corrupt", "foreign", "errors", "removed", "missing_profile")


@runtime_checkable
class ChunkStore(Protocol):
    """Where chunk KV records live. Keys come from `chunk_key`."""

    def get(self, key: str) -> ChunkRecord | None:
        """The record, or None on a miss, a bad entry (evicted) or an unreachable store."""
        ...

    def put(self, key: str, record: ChunkRecord) -> None:
        """Store `record` under `key`; failures are counted in stats, never raised."""
        ...

    def contains(self, key: str) -> bool: ...

    def remove(self, key: str) -> bool:
        """Delete one entry; True if it existed."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters (hits, misses, puts, evictions, corrupt, foreign, errors) plus entries and bytes."""
        ...


class BackendUnavailable(Exception):
    """Raised by a backend's primitive when the backend cannot be reached (turned into a miss)."""


class ByteStore(ABC):
    """A store of encoded blobs. Subclasses implement the five byte primitives."""

    kind = "bytes"

    def __init__(self, codec: Codec | str = "raw") -> None:
        self.codec: Codec = get_codec(codec) if isinstance(codec, str) else codec
        self._counts = dict.fromkeys(STAT_FIELDS, 0)
        self._count_lock = threading.Lock()
        self.last_error: str | None = None

    # --- primitives ------------------------------------------------------------------------------------------
    @abstractmethod
    def _read(self, key: str) -> bytes | None: ...

    @abstractmethod
    def _write(self, key: str, blob: bytes) -> None: ...

    @abstractmethod
    def _delete(self, key: str) -> bool: ...

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _keys(self) -> Iterator[str]: ...

    @abstractmethod
    def _usage(self) -> tuple[int, int]:
        """(entries, bytes)."""

    # --- public API --------------------------------------------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            self._counts[name] += n

    def _probe(self) -> None:
        """Raise BackendUnavailable when the backend cannot be reached (cheap: one lookup, no scan)."""
        self._exists("0" * 64)

    def reachable(self) -> str | None:
        """None when the backend answers, else why not (for readiness checks; counted like any failure)."""
        try:
            self._probe()
        except BackendUnavailable as exc:
            self._down(exc)
            return self.last_error
        return None

    def _down(self, exc: BaseException) -> None:
        self._count("errors")
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("KV store %s unavailable: %s", type(self).__name__, self.last_error)

    def get(self, key: str) -> ChunkRecord | None:
        _check_key(key)
        try:
            blob = self._read(key)
        except BackendUnavailable as exc:
            self._down(exc)
            return None
        if blob is None:
            self._count("misses")
            return None
        try:
            record = decode_record(blob, expected_key=key, codec=self.codec)
        except MissingProfileError as exc:
            # The entry is fine; this process lacks the codec profile it needs: a miss, never an eviction.
            log.warning("cannot decode KV entry %s here: %s", key, exc)
            self._count("missing_profile")
            self._count("misses")
            return None
        except ForeignModelError:
            self._count("foreign")
            self._evict_bad(key)
            return None
        except CodecError as exc:
            log.warning("evicting corrupt KV entry %s: %s", key, exc)
            self._count("corrupt")
            self._evict_bad(key)
            return None
        self._count("hits")
        return record

    def _evict_bad(self, key: str) -> None:
        self._count("misses")
        try:
            self._delete(key)
        except BackendUnavailable as exc:
            self._down(exc)

    def get_blob(self, key: str) -> bytes | None:
        """The stored bytes of one entry, undecoded (None if absent or unreachable)."""
        _check_key(key)
        try:
            return self._read(key)
        except BackendUnavailable as exc:
            self._down(exc)
            return None

    def put(self, key: str, record: ChunkRecord) -> None:
        _check_key(key)
        if record.key != key:
            raise ConfigError(f"record key {record.key} does not match the key it is stored under ({key})")
        self.put_blob(key, encode_record(record, self.codec))

    def put_blob(self, key: str, blob: bytes) -> None:
        """Store already-encoded bytes (used by `warm` and tests that plant bad entries)."""
        _check_key(key)
        try:
            self._write(key, blob)
        except BackendUnavailable as exc:
            self._down(exc)
            return
        self._count("puts")

    def contains(self, key: str) -> bool:
        _check_key(key)
        try:
            return self._exists(key)
        except BackendUnavailable as exc:
            self._down(exc)
            return False

    def remove(self, key: str) -> bool:
        _check_key(key)
        try:
            gone = self._delete(key)
        except BackendUnavailable as exc:
            self._down(exc)
            return False
        if gone:
            self._count("removed")
        return gone

    def keys(self) -> list[str]:
        """Every key held (empty if the backend is unreachable)."""
        try:
            return sorted(self._keys())
        except BackendUnavailable as exc:
            self._down(exc)
            return []

    def verify(self) -> dict[str, int]:
        """Decode every entry; evict the bad ones. Returns counts of ok / corrupt / foreign entries, and of
        entries kept unverified because their codec profile is not loaded here (`missing_profile`)."""
        result = {"ok": 0, "corrupt": 0, "foreign": 0, "missing_profile": 0}
        for key in self.keys():
            before = dict(self._counts)
            if self.get(key) is not None:
                result["ok"] += 1
            elif self._counts["corrupt"] > before["corrupt"]:
                result["corrupt"] += 1
            elif self._counts["foreign"] > before["foreign"]:
                result["foreign"] += 1
            elif self._counts["missing_profile"] > before["missing_profile"]:
                result["missing_profile"] += 1
        return result

    def entries(self) -> Iterator[dict[str, Any]]:
        """What each entry holds, read from its header (no payload is decoded): key, bytes, codec,
        codec_version, tokens, fingerprint; an unreadable entry has `codec` None and an `error`."""
        for key in self.keys():
            blob = self.get_blob(key)
            if blob is None:
                continue
            try:
                h = read_header(blob)
            except CodecError as exc:
                yield {"key": key, "bytes": len(blob), "codec": None, "error": str(exc)}
                continue
            yield {"key": key, "bytes": len(blob), "codec": h["codec"], "codec_version": h["codec_version"],
                   "tokens": h["num_tokens"], "fingerprint": h["fingerprint"]}

    def counters(self) -> dict[str, int]:
        """The event counters alone (no scan of the backend: cheap enough to read on every step)."""
        with self._count_lock:
            return dict(self._counts)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = self.counters()
        try:
            entries, nbytes = self._usage()
            out["available"] = True
        except BackendUnavailable as exc:
            self._down(exc)
            entries, nbytes = 0, 0
            out["available"] = False
        out.update(store=type(self).__name__, codec=self.codec.name, entries=entries, bytes=nbytes,
                   last_error=self.last_error)
        return out

    def close(self) -> None:
        """Release connections or handles (no-op by default)."""


def _check_key(key: str) -> None:
    if not is_chunk_key(key):
        raise ConfigError(f"{key!r} is not a chunk key (use ragzip.kvstore.key.chunk_key)")


def open_store(spec: str, *, codec: str = "raw", max_bytes: int | None = None) -> ByteStore:
    """Build a store from a URL-like spec: `memory`, `disk:/path` (or a bare path), `redis://host:port/db`.

    Raises:
        ConfigError: unknown scheme.
    """
    from ragzip.kvstore.stores.disk import DiskStore
    from ragzip.kvstore.stores.memory import MemoryStore
    from ragzip.kvstore.stores.redis import RedisStore

    if spec == "memory":
        return MemoryStore(max_bytes or (1 << 30), codec=codec)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(spec, codec=codec)
    if spec.startswith("disk:"):
        spec = spec[len("disk:"):]
    if "://" in spec:
        raise ConfigError(f"unknown KV store {spec!r}; use memory, disk:/path or redis://host:port/db")
    return DiskStore(spec, max_bytes=max_bytes or (8 << 30), codec=codec)
