"""The compressor plug point and the helpers every compressor shares."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ragzip.budget import Budget
from ragzip.tokens import TokenCounter
from ragzip.types import CompressedDocument, CompressionResult, Document, StageStats


@runtime_checkable
class Compressor(Protocol):
    """Narrows retrieved documents for one query under a budget.

    `is_query_agnostic` is True when the output does not depend on the query: only such output can be cached
    per chunk (and so feed KV reuse and provider prompt caches).
    """

    name: str
    is_query_agnostic: bool

    def compress(self, query: str, documents: Sequence[Document], budget: Budget) -> CompressionResult: ...

    def compress_batch(
        self, queries: Sequence[str], documents: Sequence[Sequence[Document]], budget: Budget
    ) -> list[CompressionResult]: ...


class BaseCompressor:
    """Shared plumbing: token counting, timing, result building and a default batched loop.

    Subclasses implement `_compress(query, documents, budget) -> (kept documents, info)`.
    """

    name = "base"
    is_query_agnostic = False

    def __init__(self, counter: TokenCounter) -> None:
        self.counter = counter

    def _compress(
        self, query: str, documents: Sequence[Document], budget: Budget
    ) -> tuple[list[CompressedDocument], dict[str, object]]:
        raise NotImplementedError

    def compress(self, query: str, documents: Sequence[Document], budget: Budget | None = None) -> CompressionResult:
        budget = budget or Budget()
        start = time.perf_counter()
        kept, info = self._compress(query, list(documents), budget)
        seconds = time.perf_counter() - start
        before = sum(self.counter.count_batch([d.text for d in documents]))
        after = sum(self.counter.count_batch([d.text for d in kept]))
        stage = StageStats(self.name, before, after, seconds, info)
        return CompressionResult(self.name, tuple(kept), before, after, seconds, (stage,))

    def compress_batch(
        self, queries: Sequence[str], documents: Sequence[Sequence[Document]], budget: Budget | None = None
    ) -> list[CompressionResult]:
        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries but {len(documents)} document lists")
        return [self.compress(q, d, budget) for q, d in zip(queries, documents)]


def select_within_limit(scores: Sequence[float], costs: Sequence[int], limit: int | None) -> list[int]:
    """Indices of the highest-scoring units whose total cost fits `limit`, in original order.

    Greedy by score; a unit that does not fit is skipped and smaller ones are still tried, so the cap is never
    exceeded. With no limit every unit is returned.
    """
    if limit is None:
        return list(range(len(scores)))
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    chosen: list[int] = []
    total = 0
    for i in order:
        if total + costs[i] <= limit:
            chosen.append(i)
            total += costs[i]
    return sorted(chosen)
