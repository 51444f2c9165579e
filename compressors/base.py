"""The compressor plug point and the helpers every compressor shares."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from ragzip.budget import Budget, BudgetLike, to_budget
from ragzip.contract import DocumentLike, to_documents, to_question
from ragzip.errors import BudgetError, ConfigError
from ragzip.options import parse_options
from ragzip.spans import assemble, compose
from ragzip.tokens import TokenCounter
from ragzip.types import CONTEXT_SEPARATOR, CompressedDocument, CompressionResult, Document, StageStats

_WORD = re.compile(r"\S+")


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
class CompressionRequest:
    """One independent compression of a batch: what `compress(query, documents, budget)` takes."""

    query: str | None
    documents: Sequence[DocumentLike]
    budget: BudgetLike = None


RequestLike = CompressionRequest | tuple[Any, ...]


def as_request(item: RequestLike) -> CompressionRequest:
    """A `CompressionRequest` from itself or a `(query, documents[, budget])` tuple."""
    if isinstance(item, tuple) and len(item) in (2, 3):
        item = CompressionRequest(*item)
    if isinstance(item, CompressionRequest):
        # documents are read twice (the batched forward, then compress): a one-shot iterable is kept as a tuple
        docs = item.documents
        return item if isinstance(docs, Sequence) else CompressionRequest(item.query, tuple(docs), item.budget)
    raise ConfigError(f"a request is a CompressionRequest or a (query, documents[, budget]) tuple, "
                      f"not {type(item).__name__}")


def batch_requests(queries: Sequence[Any], documents: Sequence[Any], budget: Any = None) -> list[CompressionRequest]:
    """`compress_batch`'s arguments (one budget for all) as requests; refuses lists of different lengths."""
    if len(queries) != len(documents):
        raise ConfigError(f"{len(queries)} queries but {len(documents)} document lists")
    return [CompressionRequest(q, d, budget) for q, d in zip(queries, documents)]


def compress_each(compress: Callable[..., CompressionResult], requests: Sequence[CompressionRequest], *,
                  return_exceptions: bool) -> list[Any]:
    """`compress` on every request in order. With `return_exceptions`, a request that fails holds its exception
    in its slot and the others go on (one bad request fails only itself); without, the first failure raises."""
    out: list[Any] = []
    for r in requests:
        try:
            out.append(compress(r.query, r.documents, r.budget))
        except Exception as exc:  # noqa: BLE001 - handed back to the caller whose request it was
            if not return_exceptions:
                raise
            out.append(exc)
    return out


def parsed_requests(requests: Sequence[CompressionRequest]) -> list[tuple[str, list[Document]]]:
    """(question, documents) of each request that parses, for a `prefetched` batch; a request that does not is left
    to fail in its own `compress` call (where its error is reported for it alone)."""
    out = []
    for r in requests:
        try:
            out.append((to_question(r.query), to_documents(r.documents)))
        except (ValueError, TypeError):  # InputError is a ValueError
            continue
    return out


class PrefetchMemo:
    """What a compressor's `prefetched` context computed for a batch of requests, visible to the `compress` calls
    made inside it, per compressor instance (a ContextVar: other threads and tasks never see it)."""

    def __init__(self, name: str) -> None:
        self._var: ContextVar[dict[int, Any] | None] = ContextVar(name, default=None)

    @contextmanager
    def holding(self, owner: object, memo: Any) -> Iterator[None]:
        token = self._var.set({**(self._var.get() or {}), id(owner): memo})
        try:
            yield
        finally:
            self._var.reset(token)

    def get(self, owner: object) -> Any:
        return (self._var.get() or {}).get(id(owner))


def compress_many(compressor: Any, requests: Sequence[RequestLike], *, return_exceptions: bool = False) -> list[Any]:
    """`compressor.compress_many` where it has one (batched), else its `compress` on each request in turn (a
    plug-in that implements only the `Compressor` protocol)."""
    batch = [as_request(r) for r in requests]
    many = getattr(compressor, "compress_many", None)
    if many is not None:
        return list(many(batch, return_exceptions=return_exceptions))
    return compress_each(compressor.compress, batch, return_exceptions=return_exceptions)


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
    # What the final exact fit drops when the joined output is over the cap: whole kept pieces ("span": sentences,
    # items) or single words ("word": token pruners); see `fit_to_limit`.
    fit_unit = "span"
    # True when `_compress` counts the joined output itself (separators included) and can take the exact limit;
    # otherwise it gets the limit less one separator per extra document.
    counts_separators = False
    # The uncompressed baseline: keeps every document whatever the budget (no fit, no cap).
    keeps_everything = False

    @property
    def default_budget(self) -> Budget:
        """The budget used when a call gives none: `auto` for compressors that take it, else the empty default."""
        return Budget.auto() if "auto" in self.budget_kinds else Budget()

    def __init__(self, counter: TokenCounter, options: Any = None, **values: Any) -> None:
        """`options` is an `Options` instance or a mapping; keyword `values` (strings from the CLI are fine)
        override it. An unknown key or a bad value is a ConfigError."""
        self.counter = counter
        self.options = parse_options(self.Options, merge_options(options, values), owner=f"compressor {self.name!r}")

    def _compress(
        self, query: str, documents: Sequence[Document], budget: Budget, tokens: Sequence[int]
    ) -> tuple[list[CompressedDocument], dict[str, object]]:
        raise NotImplementedError

    def compress(self, query: str | None, documents: Sequence[DocumentLike], budget: BudgetLike = None, *,
                 input_tokens: Sequence[int] | None = None, rate: float | None = None,
                 target_tokens: int | None = None, threshold: float | None = None,
                 coverage: float | None = None) -> CompressionResult:
        """Compress `documents` (as `RagZip.compress` takes them) for `query` under the budget.

        `count(result.text) <= limit` holds exactly (separators included) for a rate or target_tokens budget, where
        the limit is computed from the count of the joined input text.
        """
        budget = to_budget(budget, rate=rate, target_tokens=target_tokens, threshold=threshold, coverage=coverage)
        if budget is None or budget.kind is None:
            budget = self.default_budget
        check_budget_kind(self.name, budget, self.budget_kinds)
        query, documents = to_question(query), to_documents(documents)
        start = time.perf_counter()
        tokens = list(input_tokens) if input_tokens is not None else self.counter.count_batch(
            [d.text for d in documents])
        if len(tokens) != len(documents):
            raise ValueError(f"{len(tokens)} token counts for {len(documents)} documents")
        before = joined_tokens(self.counter, [d.text for d in documents], tokens)
        limit = budget.token_limit(before)
        kept, info = self._compress(query, documents, self._inner_budget(budget, limit, documents), tokens)
        kept, dropped = fit_to_limit([d for d in kept if d.text.strip()], None if self.keeps_everything else limit,
                                     self.counter, unit=self.fit_unit)
        if dropped:
            info = {**info, "fit_dropped": dropped}
        seconds = time.perf_counter() - start
        known = {d.id: (d.text, n) for d, n in zip(documents, tokens)}  # a piece kept whole needs no recount
        kept = [replace(d, tokens=known[d.id][1]) if d.tokens is None and known.get(d.id, ("", 0))[0] == d.text
                else d for d in kept]
        missing = [i for i, d in enumerate(kept) if d.tokens is None]
        for i, n in zip(missing, self.counter.count_batch([kept[i].text for i in missing]) if missing else []):
            kept[i] = replace(kept[i], tokens=n)
        counts = [d.tokens or 0 for d in kept]
        after = joined_tokens(self.counter, [d.text for d in kept], counts)
        stage = StageStats(self.name, before, after, seconds, info)
        return CompressionResult(self.name, tuple(kept), before, after, seconds, (stage,),
                                 {d.id: n for d, n in zip(documents, tokens)}, budget.as_dict())

    def _inner_budget(self, budget: Budget, limit: int | None, documents: Sequence[Document]) -> Budget:
        """The budget `_compress` selects under: the exact limit as a token cap, less room for the separators
        between documents unless the compressor counts them itself."""
        if limit is None:
            return budget
        if not self.counts_separators:
            pieces = sum(1 for d in documents if d.text.strip())
            limit -= separator_tokens(self.counter) * max(0, pieces - 1)
        return budget.with_cap(max(1, limit)) if budget.is_auto else Budget.tokens(max(1, limit))

    def prefetched(self, requests: Sequence[CompressionRequest]) -> AbstractContextManager[None]:
        """Where a compressor runs a model, the model work of several requests done together (one set of batched
        forwards), for the `compress` calls made inside the context to reuse. Default: nothing to share."""
        return nullcontext()

    def compress_many(self, requests: Sequence[RequestLike], *, return_exceptions: bool = False) -> list[Any]:
        """Compress several independent requests, each exactly as `compress` would, with their encoder forwards
        batched together (`prefetched`): faster per request than one call after another.

        Args:
            requests: `CompressionRequest`s or `(query, documents[, budget])` tuples.
            return_exceptions: a failing request's slot holds its exception and the others are still compressed
                (default: the first failure raises).

        Returns:
            One `CompressionResult` (or exception) per request, in order.
        """
        batch = [as_request(r) for r in requests]
        with self.prefetched(batch):
            return compress_each(self.compress, batch, return_exceptions=return_exceptions)

    def compress_batch(
        self, queries: Sequence[str], documents: Sequence[Sequence[Document]], budget: Budget | None = None
    ) -> list[CompressionResult]:
        return self.compress_many(batch_requests(queries, documents, budget))


def check_budget_kind(name: str, budget: Budget, kinds: frozenset[str]) -> None:
    """Refuse a budget kind the compressor cannot honour (rather than silently applying a default)."""
    kind = budget.kind
    if kind is not None and kind not in kinds:
        raise BudgetError(f"{name!r} does not take a {kind} budget; use one of {sorted(kinds)}")


def select_within_limit(scores: Sequence[float], costs: Sequence[int], limit: int | None, *,
                        docs: Sequence[int] | None = None, separator: int = 0,
                        exact: Callable[[list[int]], int] | None = None) -> list[int]:
    """Indices of the highest-scoring units whose total cost fits `limit`, in original order.

    Greedy by score; a unit that does not fit is skipped and smaller ones are still tried, so the cap is never
    exceeded. With `docs` (the document of each unit), the first unit kept from each document after the first
    also pays `separator` tokens, the join `CompressionResult.text` puts between documents. That price is an upper
    bound (a tokenizer may merge the separator with the sentence end before it), so with `exact` (the true token
    count of the output a set of indices gives) a unit that misses only by its separator is counted exactly
    instead of dropped. With no limit every unit is returned.
    """
    if limit is None:
        return list(range(len(scores)))
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    chosen: list[int] = []
    used: set[int] = set()
    total = -separator if docs is not None else 0  # the first document needs no separator before it
    priced = total  # separator tokens `total` holds as estimates (not yet counted exactly)
    for i in order:
        joins = separator if docs is not None and docs[i] not in used else 0
        fits = total + costs[i] + joins <= limit
        if not fits and exact is not None and total - priced + costs[i] <= limit:
            count = exact(sorted([*chosen, i]))  # only the separators are in doubt: count them
            if count <= limit:
                fits, total, priced, joins = True, count - costs[i], 0, 0
        elif fits:
            priced += joins
        if fits:
            chosen.append(i)
            total += costs[i] + joins
            if docs is not None:
                used.add(docs[i])
    return sorted(chosen)


def separator_tokens(counter: TokenCounter) -> int:
    """Tokens one context separator adds between two pieces (1 for BPE tokenizers, 0 for word counts)."""
    return max(0, counter.count(f"a{CONTEXT_SEPARATOR}b") - counter.count("a") - counter.count("b"))


def joined_tokens(counter: TokenCounter, texts: Sequence[str], counts: Sequence[int] | None = None) -> int:
    """Tokens of the texts as one context (`CompressionResult.text`: non-blank texts joined by the separator).
    One text needs no joining, so its own count is reused when given."""
    live = [(t, counts[i] if counts is not None else None) for i, t in enumerate(texts) if t.strip()]
    if not live:
        return 0
    if len(live) == 1 and live[0][1] is not None:
        return int(live[0][1])
    return counter.count(CONTEXT_SEPARATOR.join(t for t, _ in live))


def fit_to_limit(kept: Sequence[CompressedDocument], limit: int | None, counter: TokenCounter, *,
                 unit: str = "span") -> tuple[list[CompressedDocument], int]:
    """`kept` trimmed until the joined text counts at most `limit` tokens; also returns how many units it dropped.

    Selection counts pieces one by one; joining them (and BPE merges across the joins) can add a few tokens, and a
    "keep at least one" rule can overshoot. The units dropped are kept pieces (`unit="span"`) or words
    (`unit="word"`), lowest score first, later first on ties; the fewest that make it fit (binary search). When a
    single unit is still too long it is cut to its leading words that fit; what remains is always source text.
    """
    kept = list(kept)
    if limit is None or joined_tokens(counter, [d.text for d in kept]) <= limit:
        return kept, 0
    units: list[tuple[int, int, int, int]] = []  # (piece index, range index, start, end) in the piece's text
    priority: list[tuple[float, int]] = []
    for i, d in enumerate(kept):
        ranges = list(d.offsets) or [(0, len(d.text))]
        for j, (a, b) in enumerate(ranges):
            score = float(d.scores[j]) if len(d.scores) == len(ranges) else 0.0
            parts = [(a + m.start(), a + m.end()) for m in _WORD.finditer(d.text[a:b])] if unit == "word" else [(a, b)]
            for a2, b2 in parts:
                priority.append((score, -len(units)))
                units.append((i, j, a2, b2))
    order = sorted(range(len(units)), key=lambda u: priority[u])  # the first to drop come first

    def piece(d: CompressedDocument, ranges: list[tuple[int, int]], scores: tuple[float, ...]) -> CompressedDocument:
        return replace(compose(d, assemble(d.as_document(), ranges, keep_line_breaks=True)), scores=scores, tokens=None)

    def render(alive: set[int]) -> list[CompressedDocument]:
        out = []
        for i, d in enumerate(kept):
            mine = [(j, a, b) for u, (k, j, a, b) in enumerate(units) if k == i and u in alive]
            if mine:
                whole = unit == "span" and len(d.scores) == len(d.offsets or [0])
                out.append(piece(d, [(a, b) for _, a, b in mine], tuple(d.scores[j] for j, _, _ in mine) if whole
                                 else ()))
        return out

    def fits(drop: int) -> bool:
        return joined_tokens(counter, [d.text for d in render(set(order[drop:]))]) <= limit

    lo, hi = 1, len(units)  # the fewest dropped units that fit; all dropped (empty) always fits
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    if lo < len(units):
        return render(set(order[lo:])), lo
    # Nothing whole fits: the best unit's leading words that do (the most, by binary search), or nothing at all.
    i, _, a, b = units[order[-1]]
    words = [(a + m.start(), a + m.end()) for m in _WORD.finditer(kept[i].text[a:b])]
    best: list[CompressedDocument] = []
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        cut = piece(kept[i], [(words[0][0], words[mid - 1][1])], ())
        if counter.count(cut.text) <= limit:
            lo, best = mid, [cut]
        else:
            hi = mid - 1
    return best, len(units)
