"""The compressor plug point and the helpers every compressor shares."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from ragzip.budget import Budget
from ragzip.errors import BudgetError, ConfigError
from ragzip.options import parse_options
from ragzip.tokens import TokenCounter
from ragzip.types import CompressedDocument, CompressionResult, Document, StageStats


@runtime_checkable
class Compressor(Protocol):
    """Narrows retrieved documents for one query under a budget.

    `input_tokens` (one count per document, in the counter's tokens) lets a pipeline hand over counts it already
    has, so each stage counts only its output.
    """

    name: str

    def compress(self, query: str, documents: Sequence[Document], budget: Budget | None = None, *,
                 input_tokens: Sequence[int] | None = None) -> CompressionResult: ...

    def compress_batch(
        self, queries: Sequence[str], documents: Sequence[Sequence[Document]], budget: Budget | None = None
    ) -> list[CompressionResult]: ...


@dataclass(frozen=True, slots=True)
class NoOptions:
    """A compressor without options."""


def merge_options(options: Any, values: Mapping[str, Any]) -> Any:
    """`options` (a dataclass instance, a mapping or None) with `values` laid over it."""
    if not values:
        return options
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        options = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    return {**dict(options or {}), **values}


class BaseCompressor:
    """Shared plumbing: token counting (input once, output once), timing, result building, a batched loop.

    Subclasses implement `_compress(query, documents, budget, tokens) -> (kept documents, info)`, where `tokens`
    are the input documents' token counts, and say which budget kinds they honour in `budget_kinds`.
    """

    name = "base"
    budget_kinds: frozenset[str] = frozenset({"rate", "target_tokens", "threshold"})
    Options: type = NoOptions  # the compressor's options: a frozen dataclass, parsed by `ragzip.options`

    def __init__(self, counter: TokenCounter, options: Any = None, **values: Any) -> None:
        """`options` is an `Options` instance or a mapping; keyword `values` (strings from the CLI are fine)
        override it. An unknown key or a bad value is a ConfigError."""
        self.counter = counter
        self.options = parse_options(self.Options, merge_options(options, values), owner=f"compressor {self.name!r}")

    def _compress(
        self, query: str, documents: Sequence[Document], budget: Budget, tokens: Sequence[int]
    ) -> tuple[list[CompressedDocument], dict[str, object]]:
        raise NotImplementedError

    def compress(self, query: str, documents: Sequence[Document], budget: Budget | None = None, *,
                 input_tokens: Sequence[int] | None = None) -> CompressionResult:
        budget = budget or Budget()
        check_budget_kind(self.name, budget, self.budget_kinds)
        documents = list(documents)
        start = time.perf_counter()
        tokens = list(input_tokens) if input_tokens is not None else self.counter.count_batch(
            [d.text for d in documents])
        if len(tokens) != len(documents):
            raise ValueError(f"{len(tokens)} token counts for {len(documents)} documents")
        kept, info = self._compress(query, documents, budget, tokens)
        seconds = time.perf_counter() - start
        counts = self.counter.count_batch([d.text for d in kept])
        kept = [replace(d, tokens=n) for d, n in zip(kept, counts)]
        before, after = sum(tokens), sum(counts)
        stage = StageStats(self.name, before, after, seconds, info)
        return CompressionResult(self.name, tuple(kept), before, after, seconds, (stage,),
                                 {d.id: n for d, n in zip(documents, tokens)})

    def compress_batch(
        self, queries: Sequence[str], documents: Sequence[Sequence[Document]], budget: Budget | None = None
    ) -> list[CompressionResult]:
        if len(queries) != len(documents):
            raise ConfigError(f"{len(queries)} queries but {len(documents)} document lists")
        return [self.compress(q, d, budget) for q, d in zip(queries, documents)]


def check_budget_kind(name: str, budget: Budget, kinds: frozenset[str]) -> None:
    """Refuse a budget kind the compressor cannot honour (rather than silently applying a default)."""
    kind = budget.kind
    if kind is not None and kind not in kinds:
        raise BudgetError(f"{name!r} does not take a {kind} budget; use one of {sorted(kinds)}")


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
