"""A retriever: chunk, embed and index documents; return the top-k chunks for a query."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ragzip.retrieval.chunking import chunk_document
from ragzip.retrieval.embed import Embedder
from ragzip.retrieval.index import IndexKind, VectorIndex
from ragzip.tokens import TokenCounter, get_token_counter
from ragzip.types import Document


class Retriever:
    """Dense retrieval over chunks of the added documents.

    Example:
        >>> r = Retriever()
        >>> r.add([Document("a", "Paris is the capital of France.")])
        >>> [d.id for d, _ in r.search("capital of France", k=1)]
        ['a#0']
    """

    def __init__(self, *, embedder: str | None = None, kind: str | IndexKind = IndexKind.FLAT,
                 chunk_tokens: int = 256, counter: TokenCounter | None = None, index: VectorIndex | None = None,
                 device: str | None = "auto"):
        self.embedder = Embedder(embedder or (index.embedder if index else None), device=device)
        self.counter = counter or get_token_counter(None)
        self.chunk_tokens = chunk_tokens
        self.index = index or VectorIndex(self.embedder.dim, kind=kind, embedder=self.embedder.name)

    def add(self, documents: Sequence[Document]) -> int:
        """Chunk, embed and index `documents`; returns the number of chunks added. An id already in the index is
        an InputError (`unindexed` leaves out the documents indexed as they are, for idempotent re-adds)."""
        chunks = [c for d in documents for c in chunk_document(d, self.counter, max_tokens=self.chunk_tokens)]
        if chunks:
            self.index.add(chunks, self.embedder.encode([c.text for c in chunks]))
        return len(chunks)

    def unindexed(self, documents: Sequence[Document]) -> list[Document]:
        """`documents` less those already indexed as they are (same id, same chunks): what adding a file again
        has to add."""
        indexed = {d.id: (d.text, d.title) for d in self.index.documents}
        out = []
        for d in documents:
            mine = chunk_document(d, self.counter, max_tokens=self.chunk_tokens)
            same = bool(mine) and all(indexed.get(c.id) == (c.text, c.title) for c in mine) and (
                f"{d.id}#{len(mine)}" not in indexed)
            if not same:
                out.append(d)
        return out

    def search(self, query: str, k: int = 5) -> list[tuple[Document, float]]:
        return self.index.search(self.embedder.encode([query])[0], k)

    def save(self, path: str | Path) -> None:
        self.index.save(path)

    @classmethod
    def load(cls, path: str | Path, *, counter: TokenCounter | None = None, device: str | None = "auto") -> Retriever:
        index = VectorIndex.load(path)
        return cls(index=index, counter=counter, device=device)
