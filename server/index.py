"""The proxy's own document index (`POST /v1/documents`), searched when a chat request brings no context."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import anyio

from ragzip.server.config import ServerConfig
from ragzip.server.errors import APIError
from ragzip.types import Document


class IndexService:
    """A lazily built `Retriever` (the embedder loads on the first add), guarded by a lock."""

    def __init__(self, config: ServerConfig, *, tokenizer: str | None = None, device: str | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self._retriever: Any = None
        self._lock = threading.Lock()
        self._num_added = 0

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
        return await anyio.to_thread.run_sync(self._clear)

    async def get(self, document_id: str) -> list[Document]:
        """The indexed chunks of one added document, in order (empty when no document has that id)."""
        return await anyio.to_thread.run_sync(self._get, document_id)

    def next_ids(self, n: int) -> list[str]:
        return [f"doc-{self._num_added + i}" for i in range(n)]

    async def add(self, documents: Sequence[Document]) -> int:
        """Chunk, embed and index `documents`; returns the number of chunks added."""
        return await anyio.to_thread.run_sync(self._add, documents)

    async def search(self, query: str, k: int) -> list[Document]:
        """The top-`k` chunks for `query` (empty when nothing has been added)."""
        if self.size == 0 or not query:
            return []
        return await anyio.to_thread.run_sync(self._search, query, k)
