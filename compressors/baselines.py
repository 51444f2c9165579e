"""Baseline compressors: identity, head truncation, random sentence/word drop, embedding top-k sentences."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ragzip.budget import Budget
from ragzip.compressors.base import BaseCompressor, joined_tokens, select_within_limit, separator_tokens
from ragzip.options import bounds
from ragzip.spans import assemble
from ragzip.text import split_sentences
from ragzip.types import CompressedDocument, Document

_WORD = re.compile(r"\S+")
DEFAULT_RATE = 0.5


def _limit(budget: Budget, tokens_before: int) -> int:
    """Baselines need a token limit; with the default budget they keep DEFAULT_RATE (a threshold is refused)."""
    limit = budget.token_limit(tokens_before)
    return limit if limit is not None else max(1, int(DEFAULT_RATE * tokens_before))


def _units(documents: Sequence[Document], unit: str) -> list[tuple[int, int, int]]:
    """(doc index, start, end) of every sentence or word, in reading order."""
    out = []
    for i, doc in enumerate(documents):
        if unit == "sentence":
            out.extend((i, a, b) for a, b in split_sentences(doc.text))
        else:
            out.extend((i, m.start(), m.end()) for m in _WORD.finditer(doc.text))
    return out


def _build(documents: Sequence[Document], units: list[tuple[int, int, int]], chosen: Sequence[int],
           scores: Sequence[float] | None = None) -> list[CompressedDocument]:
    per_doc: dict[int, list[int]] = {}
    for k in chosen:
        per_doc.setdefault(units[k][0], []).append(k)
    kept = []
    for i, doc in enumerate(documents):
        if i in per_doc:
            ks = per_doc[i]
            kept.append(assemble(doc, [(units[k][1], units[k][2]) for k in ks],
                                 scores=[scores[k] for k in ks] if scores is not None else ()))
    return kept


def _exact_count(counter: Any, documents: Sequence[Document], units: list[tuple[int, int, int]]
                 ) -> Callable[[list[int]], int]:
    """The exact token count of the context the chosen units give (for `select_within_limit`)."""
    return lambda chosen: joined_tokens(counter, [d.text for d in _build(documents, units, chosen)])


class IdentityCompressor(BaseCompressor):
    """Keeps everything (the uncompressed baseline), whatever the budget."""

    name = "none"
    keeps_everything = True

    def _compress(self, query: str, documents: Sequence[Document], budget: Budget,  # type: ignore[no-untyped-def]
                  tokens: Sequence[int]):
        return [assemble(d, [(0, len(d.text))]) for d in documents if d.text], {}


class TruncateCompressor(BaseCompressor):
    """Keeps the head of the context (whole words, documents in order) up to the budget."""

    name = "truncate"
    budget_kinds = frozenset({"rate", "target_tokens"})
    fit_unit = "word"
    counts_separators = True

    def _compress(self, query: str, documents: Sequence[Document], budget: Budget,  # type: ignore[no-untyped-def]
                  tokens: Sequence[int]):
        units = _units(documents, "word")
        limit = _limit(budget, sum(tokens))

        exact = _exact_count(self.counter, documents, units)

        def cost(n: int) -> int:  # exact count of the context the first n words would give, separators included
            return exact(list(range(n)))

        lo, hi = 0, len(units)  # largest n with cost(n) <= limit (cost grows with n)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid) <= limit else (lo, mid - 1)
        chosen = list(range(max(lo, 1 if units else 0)))  # never an empty context
        return _build(documents, units, chosen), {"limit": limit}


class Unit(str, Enum):
    SENTENCE = "sentence"
    WORD = "word"


@dataclass(frozen=True, slots=True)
class RandomOptions:
    unit: Unit = Unit.SENTENCE  # what is kept or dropped whole
    seed: int = 0  # mixed with the query, so a query's result repeats


class RandomCompressor(BaseCompressor):
    """Keeps random sentences (or words) up to the budget, seeded by the query so results repeat."""

    name = "random"
    budget_kinds = frozenset({"rate", "target_tokens"})
    Options = RandomOptions
    options: RandomOptions
    counts_separators = True

    @property
    def fit_unit(self) -> str:  # type: ignore[override]
        return "word" if self.options.unit is Unit.WORD else "span"

    def _compress(self, query: str, documents: Sequence[Document], budget: Budget,  # type: ignore[no-untyped-def]
                  tokens: Sequence[int]):
        unit = self.options.unit.value
        units = _units(documents, unit)
        costs = self.counter.count_batch([documents[i].text[a:b] for i, a, b in units])
        limit = _limit(budget, sum(tokens))
        digest = hashlib.blake2b(f"{self.options.seed}:{query}".encode(), digest_size=8).digest()
        rng = random.Random(int.from_bytes(digest, "little"))
        scores = [rng.random() for _ in units]
        chosen = select_within_limit(scores, costs, limit, docs=[i for i, _, _ in units],
                                     separator=separator_tokens(self.counter),
                                     exact=_exact_count(self.counter, documents, units)) or ([0] if units else [])
        return _build(documents, units, chosen), {"limit": limit, "unit": unit}


@dataclass(frozen=True, slots=True)
class EmbedTopKOptions:
    embedder: str | None = None  # sentence embedder: alias, path or hub name (default: the packaged MiniLM)
    device: str = "auto"  # where the embedder runs: auto (cuda when available) | cpu | cuda | cuda:N
    min_keep: int = field(default=1, metadata=bounds(low=0))  # best sentences kept even over the budget
    dtype: str = "auto"  # auto: bf16 where the CPU (or GPU) has it natively, else fp32 | float32 | bfloat16


class EmbedTopKCompressor(BaseCompressor):
    """Keeps the sentences most similar to the query (cosine of sentence embeddings), in original order.

    Threshold mode keeps sentences whose cosine passes `budget.threshold`; token budgets keep the best ones that fit.
    """

    name = "embed-topk"
    Options = EmbedTopKOptions
    options: EmbedTopKOptions
    counts_separators = True

    def _compress(self, query: str, documents: Sequence[Document], budget: Budget,  # type: ignore[no-untyped-def]
                  tokens: Sequence[int]):
        from ragzip.registry import load_embedder

        units = _units(documents, "sentence")
        if not units:
            return [], {}
        texts = [documents[i].text[a:b] for i, a, b in units]
        model: Any = load_embedder(self.options.embedder, self.options.device, self.options.dtype)
        emb = model.encode([query, *texts], batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        scores = [float(x) for x in emb[1:] @ emb[0]]
        if budget.threshold is not None:
            chosen = [k for k, s in enumerate(scores) if s >= budget.threshold]
        else:
            costs = self.counter.count_batch(texts)
            chosen = select_within_limit(scores, costs, _limit(budget, sum(costs)), docs=[i for i, _, _ in units],
                                         separator=separator_tokens(self.counter),
                                         exact=_exact_count(self.counter, documents, units))
        if len(chosen) < self.options.min_keep:
            best = sorted(range(len(scores)), key=lambda k: -scores[k])[: self.options.min_keep]
            chosen = sorted(set(chosen) | set(best))
        return _build(documents, units, chosen, scores), {"num_sentences": len(units)}
