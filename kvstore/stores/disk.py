"""Local disk store: one file per chunk, atomic writes, checksummed blobs, a size cap with LRU eviction.

Safe with several processes writing the same folder: every write goes to a private temporary file that is
fsynced and then `os.replace`d into place (readers see the old file or the new one, never a torn one), and
eviction runs under a file lock. A process killed mid-write leaves only a temporary file, which later sweeps
delete once it is older than `tmp_grace_s`.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from ragzip.errors import ConfigError
from ragzip.kvstore.codecs import Codec
from ragzip.kvstore.stores.base import BackendUnavailable, ByteStore

SUFFIX = ".kv"


class DiskStore(ByteStore):
    """Chunk records as files under `path/<model tag>/<key>.kv`.

    Args:
        path: folder (created if missing).
        max_bytes: size cap; past it, least recently used entries are deleted down to `low_water` of it.
        codec: codec name or object for new entries (any entry decodes whatever codec wrote it).
        low_water: fraction of `max_bytes` eviction brings usage down to.
        tmp_grace_s: age after which orphaned temporary files (from killed writers) are swept.
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = 8 << 30, codec: Codec | str = "raw", *,
                 low_water: float = 0.9, tmp_grace_s: float = 600.0) -> None:
        super().__init__(codec)
        if max_bytes <= 0 or not 0 < low_water <= 1:
            raise ConfigError("DiskStore needs max_bytes > 0 and 0 < low_water <= 1")
        self.root = Path(path)
        self.max_bytes = int(max_bytes)
        self.low_water = float(low_water)
        self.tmp_grace_s = float(tmp_grace_s)
        self._tmp_dir = self.root / ".tmp"
        try:
            self._tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create KV store folder {self.root}: {exc}") from exc
        self._lock = FileLock(str(self.root / ".evict.lock"), timeout=30)

    def _path(self, key: str) -> Path:
        return self.root / key[:12] / (key + SUFFIX)

    def _read(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BackendUnavailable(str(exc)) from exc
        try:
            os.utime(path)  # mtime is the LRU clock
        except OSError:
            pass  # evicted or replaced since the read: the data we have is still a complete blob
        return data

    def _write(self, key: str, blob: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self._tmp_dir, prefix=key[:12], suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(blob)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise BackendUnavailable(str(exc)) from exc
        self._enforce_cap()

    def _delete(self, key: str) -> bool:
        try:
            self._path(key).unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise BackendUnavailable(str(exc)) from exc

    def _exists(self, key: str) -> bool:
        return self._path(key).exists()

    def _probe(self) -> None:
        if not self.root.is_dir():
            raise BackendUnavailable(f"KV store folder {self.root} is gone")

    def _entries(self) -> list[tuple[float, int, Path]]:
        out = []
        for sub in os.scandir(self.root):
            if not sub.is_dir() or sub.name.startswith("."):
                continue
            for f in os.scandir(sub.path):
                if f.name.endswith(SUFFIX):
                    try:
                        st = f.stat()
                    except FileNotFoundError:
                        continue  # deleted by another process meanwhile
                    out.append((st.st_mtime, st.st_size, Path(f.path)))
        return out

    def _keys(self) -> Iterator[str]:
        return iter([p.name[: -len(SUFFIX)] for _, _, p in self._entries()])

    def _usage(self) -> tuple[int, int]:
        entries = self._entries()
        return len(entries), sum(size for _, size, _ in entries)

    def _enforce_cap(self) -> None:
        try:
            with self._lock:
                entries = self._entries()
                total = sum(size for _, size, _ in entries)
                if total > self.max_bytes:
                    target = self.max_bytes * self.low_water
                    for _, size, path in sorted(entries):
                        if total <= target:
                            break
                        try:
                            path.unlink()
                            self._count("evictions")
                        except FileNotFoundError:
                            pass
                        total -= size
                self._sweep_tmp()
        except Timeout as exc:
            raise BackendUnavailable(f"eviction lock busy: {exc}") from exc

    def _sweep_tmp(self) -> None:
        now = time.time()
        for f in os.scandir(self._tmp_dir):
            try:
                if now - f.stat().st_mtime > self.tmp_grace_s:
                    os.unlink(f.path)
            except FileNotFoundError:
                pass

    def sweep(self) -> int:
        """Delete orphaned temporary files older than `tmp_grace_s`; returns how many remain."""
        with self._lock:
            self._sweep_tmp()
        return sum(1 for _ in os.scandir(self._tmp_dir))
