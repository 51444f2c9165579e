"""The proxy's own document index (`POST /v1/documents`), searched when a chat request brings no context.

With shared state (Redis), worker processes and replicas share one index: an add is appended to a log in Redis
(documents as JSON) and every worker applies the log, in order, before it searches, lists or adds, so each holds the
same documents (each embeds them itself). A clear starts a new generation (a new, empty log; the old one expires),
so a worker that starts late replays only what was added since the last clear; a worker that finds another
generation (a clear, or a Redis that lost its data) empties its own index and replays the new log. Ids come from
one shared counter. When Redis fails, a worker adds to its own index with ids of its own (the documents are then
not seen by the others; counted as shared-state errors).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import anyio

from ragzip.server.config import ServerConfig
from ragzip.server.errors import APIError
from ragzip.server.shared import SharedState
from ragzip.types import Document

log = logging.getLogger("ragzip.server")
_GEN = "index:gen"
_IDS = "index:ids"
_SYNC_BATCH = 16  # log entries read per Redis call (each up to max_body_bytes)
_OLD_LOG_TTL_S = 3600  # a cleared generation's log lingers this long for workers still applying it


class IndexService:
    """A lazily built `Retriever` (the embedder loads on the first add), guarded by a lock."""

    def __init__(self, config: ServerConfig, *, tokenizer: str | None = None, device: str | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self._retriever: Any = None
        self._lock = threading.Lock()
        self._num_added = 0
        self.shared: SharedState | None = None  # set when the app starts with shared state
        self._applied = 0  # entries of the current generation's log applied to this worker's index
        self._generation: str | None = None
        self._sync_lock: asyncio.Lock | None = None  # one sync at a time per worker (created on its event loop)

    @property
    def size(self) -> int:
        return len(self._retriever.index) if self._retriever is not None else 0

    def _add(self, documents: Sequence[Document]) -> int:
        from ragzip.retrieval.retriever import Retriever
        from ragzip.tokens import get_token_counter

        with self._lock:
            if self.size + len(documents) > self.config.max_index_chunks:
                raise APIError(400, f"the index holds {self.size} chunks; adding {len(documents)} documents would "
                                    f"pass max_index_chunks={self.config.max_index_chunks}", code="index_full")
            if self._retriever is None:
                self._retriever = Retriever(embedder=self.config.embedder, chunk_tokens=self.config.chunk_tokens,
                                            counter=get_token_counter(self.tokenizer), device=self.device)
            added = int(self._retriever.add(documents))
            self._num_added += len(documents)
            return added

    def _search(self, query: str, k: int) -> list[Document]:
        with self._lock:
            if self._retriever is None or self.size == 0:
                return []
            return [doc for doc, _ in self._retriever.search(query, k)]

    def _get(self, document_id: str) -> list[Document]:
        with self._lock:
            if self._retriever is None:
                return []
            return [c for c in self._retriever.index.documents if c.metadata.get("source_id") == document_id]

    def _list(self, offset: int, limit: int) -> tuple[list[tuple[str, str, int]], int]:
        with self._lock:
            if self._retriever is None:
                return [], 0
            found: dict[str, tuple[str, int]] = {}  # source id -> (title, chunks), in the order they were added
            for c in self._retriever.index.documents:
                source = str(c.metadata.get("source_id", c.id))
                title, n = found.get(source, (c.title, 0))
                found[source] = (title, n + 1)
            rows = [(doc_id, title, n) for doc_id, (title, n) in found.items()]
            return rows[offset:offset + limit], len(rows)

    async def list(self, offset: int, limit: int) -> tuple[list[tuple[str, str, int]], int]:
        """A page of the added documents as (id, title, chunks), in the order they were added, and their total."""
        await self.sync()
        return await anyio.to_thread.run_sync(self._list, offset, limit)

    def _clear(self) -> tuple[int, int]:
        with self._lock:
            if self._retriever is None:
                return 0, 0
            chunks = len(self._retriever.index)
            documents = len({c.metadata.get("source_id", c.id) for c in self._retriever.index.documents})
            self._retriever = None  # the next add starts a new index (the embedder stays loaded: it is cached)
            return documents, chunks

    async def clear(self) -> tuple[int, int]:
        """Empty the index; returns the (documents, chunks) removed. New ids keep counting (never reused)."""
        await self.sync()
        if self.shared is not None and self._generation is not None:
            chunks = self._chunks()
            if await self.shared.next_generation(_GEN, self._log(self._generation), _OLD_LOG_TTL_S) is not None:
                await self.sync()  # this worker moves to the new, empty generation like the others
                return len({c.metadata.get("source_id", c.id) for c in chunks}), len(chunks)
        return await anyio.to_thread.run_sync(self._clear)

    def _chunks(self) -> list[Document]:
        with self._lock:
            return list(self._retriever.index.documents) if self._retriever is not None else []

    async def get(self, document_id: str) -> list[Document]:
        """The indexed chunks of one added document, in order (empty when no document has that id)."""
        await self.sync()
        return await anyio.to_thread.run_sync(self._get, document_id)

    async def next_ids(self, n: int) -> list[str]:
        """Ids for `n` documents added without one: unique across workers with shared state."""
        first = await self.shared.reserve_ids(_IDS, n) if self.shared is not None else None
        if first is not None:
            return [f"doc-{first + i}" for i in range(n)]
        prefix = f"doc-{os.getpid()}-" if self.shared is not None else "doc-"  # Redis down: ids of this worker's own
        return [f"{prefix}{self._num_added + i}" for i in range(n)]

    @staticmethod
    def _log(generation: str) -> str:
        return f"index:log:{generation}"

    async def sync(self) -> None:
        """Apply the shared log's entries this worker has not applied yet (nothing without shared state)."""
        if self.shared is None:
            return
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()
        async with self._sync_lock:  # two requests syncing at once would apply the same entries twice
            generation = await self.shared.get_text(_GEN)
            if generation is None and self.shared.down("index"):
                return
            generation = generation or "0"
            if generation != self._generation:  # cleared (or Redis lost its data): start over from the new log
                await anyio.to_thread.run_sync(self._clear)
                self._generation, self._applied = generation, 0
            while True:
                entries = await self.shared.read(self._log(generation), self._applied, _SYNC_BATCH)
                if not entries:
                    return
                for raw in entries:
                    await anyio.to_thread.run_sync(self._apply, raw)
                    self._applied += 1  # under the lock: each entry once, in order, whatever _apply did

    def _apply(self, raw: bytes) -> None:
        try:
            entry = json.loads(raw)
            if not isinstance(entry, dict) or entry.get("op") != "add":
                raise ValueError("not an add entry")
            self._add([Document(d["id"], d["text"], d.get("title", "")) for d in entry["documents"]])
        except APIError as exc:  # index full: the other workers refused it the same way
            log.warning("shared index entry not applied: %s", exc.message)
        except Exception as exc:  # noqa: BLE001 - a foreign or damaged entry is skipped, never fatal
            log.warning("shared index entry skipped (%s)", type(exc).__name__)

    async def add(self, documents: Sequence[Document]) -> int:
        """Chunk, embed and index `documents`; returns the number of chunks added."""
        if self.shared is not None:
            await self.sync()
            if self.size + len(documents) > self.config.max_index_chunks:  # refused before it reaches the log
                return await anyio.to_thread.run_sync(self._add, documents)
            before = self.size
            entry = {"op": "add", "documents": [{"id": d.id, "text": d.text, "title": d.title} for d in documents]}
            raw = json.dumps(entry, ensure_ascii=False).encode()
            if self._generation is not None and await self.shared.append(self._log(self._generation), [raw]):
                await self.sync()
                return max(0, self.size - before)
        return await anyio.to_thread.run_sync(self._add, documents)

    async def search(self, query: str, k: int) -> list[Document]:
        """The top-`k` chunks for `query` (empty when nothing has been added)."""
        await self.sync()
        if self.size == 0 or not query:
            return []
        return await anyio.to_thread.run_sync(self._search, query, k)
