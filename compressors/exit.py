"""EXIT-style extractive compression: keep the sentences of each document that help answer the query.

Each document is split into sentences (the title is context, never a candidate); a scorer gives every sentence a
probability of being useful *in the context of its own document*; sentences pass a threshold (threshold mode) or
the best ones fill a token budget (budget mode), in original order. Documents with nothing kept are dropped; kept
sentences are joined by a space inside a document, and documents by a blank line (`CompressionResult.text`).

Example:
    >>> from ragzip.budget import Budget
    >>> from ragzip.compressors.exit import ExitCompressor
    >>> exit_ = ExitCompressor()                       # the trained one-pass encoder scorer
    >>> result = exit_.compress("Who founded X?", documents, Budget.ratio(1 / 3))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ragzip.budget import Budget
from ragzip.compressors.base import BaseCompressor
from ragzip.compressors.exit_scorers import CausalLMScorer, EncoderScorer, SentenceScorer, fuse_scores
from ragzip.errors import ConfigError
from ragzip.retrieval.sentences import split_sentences
from ragzip.spans import assemble
from ragzip.tokens import TokenCounter, get_token_counter
from ragzip.types import CompressedDocument, Document

# Score fusion weights (see `fuse_scores`): off, since no weight beat 0 on the 10 HotpotQA calibration questions.
DEFAULT_DOC_WEIGHT = 0.0
DEFAULT_NEIGHBOR_WEIGHT = 0.0


class ScorerKind(str, Enum):
    """Which sentence scorer backs the compressor."""

    ENCODER = "encoder"
    CAUSAL_LM = "causal-lm"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One candidate sentence: document index, sentence index, char span in the document text, score."""

    doc: int
    index: int
    start: int
    end: int
    score: float


def candidate_spans(doc: Document) -> list[tuple[int, int]]:
    """Char spans of the sentences of `doc.text` (never the title), whitespace trimmed, in order."""
    return split_sentences(doc.text) if doc.text.strip() else []


class ExitCompressor(BaseCompressor):
    """Context-aware extractive sentence selection with a trained encoder or a causal-LM Yes/No scorer.

    All options accept strings (as the CLI passes them).

    Args:
        counter: token counter for budgets and statistics (default: the local LLM's tokenizer).
        scorer: "encoder" (default; one forward per query-document pair), "causal-lm" (EXIT's judge), or a
            ready `SentenceScorer` object.
        model: causal LM for the "causal-lm" scorer: alias, path or hub name (default: the embedded SmolLM2,
            zero-shot); "exit-gemma-2b" loads the published EXIT release (gemma-2b-it + LoRA) where available.
        adapter: a PEFT adapter applied on top of `model`.
        weights: encoder-scorer weights folder (default: the weights shipped in the package).
        threshold: keep sentences scoring at least this in threshold mode (default 0.5; `Budget.threshold`
            overrides it).
        min_keep: keep at least this many of the best sentences per query, even over a budget (default 1).
        doc_weight: blend of each sentence's score with its document's best sentence score (see
            `fuse_scores`; default DEFAULT_DOC_WEIGHT, chosen on the training questions).
        neighbor_weight: share of an adjacent sentence's score a sentence inherits (default
            DEFAULT_NEIGHBOR_WEIGHT).
        batch_size: encoder windows or judge prompts per forward.
        max_length: the causal-LM prompt window in tokens.
        dtype: model dtype ("auto": bf16 where the CPU has native bf16, else fp32; "bfloat16", "float32").

    Raises:
        ConfigError: an unknown scorer or an invalid number.
    """

    name = "exit"
    is_query_agnostic = False

    def __init__(self, counter: TokenCounter | None = None, *, scorer: str | SentenceScorer = "encoder",
                 model: str | None = None, adapter: str | None = None, weights: str | None = None,
                 threshold: float | str = 0.5, doc_weight: float | str | None = None,
                 neighbor_weight: float | str | None = None,
                 min_keep: int | str = 1, batch_size: int | str | None = None, max_length: int | str | None = None,
                 dtype: str = "auto") -> None:
        super().__init__(counter or get_token_counter(None))
        self.threshold = _number(threshold, "threshold", float)
        self.min_keep = _number(min_keep, "min_keep", int, minimum=0)
        self.doc_weight = _weight(doc_weight, "doc_weight", DEFAULT_DOC_WEIGHT)
        self.neighbor_weight = _weight(neighbor_weight, "neighbor_weight", DEFAULT_NEIGHBOR_WEIGHT)
        self.scorer_kind: ScorerKind | None = None
        if not isinstance(scorer, str):  # a ready scorer object (custom scorers, tests)
            self.scorer: SentenceScorer = scorer
            return
        try:
            self.scorer_kind = ScorerKind(scorer.lower())
        except ValueError:
            raise ConfigError(f"unknown scorer {scorer!r}; valid: {[s.value for s in ScorerKind]}") from None
        size = None if batch_size in (None, "") else _number(batch_size, "batch_size", int, minimum=1)
        window = None if max_length in (None, "") else _number(max_length, "max_length", int, minimum=16)
        adapter = None if adapter in (None, "", "none") else adapter
        if self.scorer_kind is ScorerKind.ENCODER:
            if model or adapter:
                raise ConfigError("model/adapter apply to scorer='causal-lm'; the encoder scorer takes 'weights'")
            self.scorer = EncoderScorer(weights, batch_size=size or 16, dtype=dtype)
        else:
            if weights:
                raise ConfigError("'weights' applies to scorer='encoder'")
            self.scorer = CausalLMScorer(model, adapter=adapter, batch_size=size or 8, max_length=window, dtype=dtype)

    def score(self, query: str, documents: Sequence[Document]) -> list[list[Candidate]]:
        """Every candidate sentence of every document with its score."""
        spans = [candidate_spans(d) for d in documents]
        scored = self.scorer.score(query, [(d.title, d.text, s) for d, s in zip(documents, spans)])
        if self.doc_weight or self.neighbor_weight:
            scored = fuse_scores(scored, doc_weight=self.doc_weight, neighbor_weight=self.neighbor_weight)
        return [[Candidate(d, i, a, b, sc) for i, ((a, b), sc) in enumerate(zip(doc_spans, doc_scores))]
                for d, (doc_spans, doc_scores) in enumerate(zip(spans, scored))]

    def _compress(self, query: str, documents: Sequence[Document],
                  budget: Budget) -> tuple[list[CompressedDocument], dict[str, object]]:
        per_doc = self.score(query, documents)
        flat = [c for cands in per_doc for c in cands]
        limit = budget.token_limit(sum(self.counter.count_batch([d.text for d in documents])))
        if limit is None:
            threshold = self.threshold if budget.threshold is None else float(budget.threshold)
            chosen = {(c.doc, c.index) for c in flat if c.score >= threshold}
            mode = "threshold"
        else:
            chosen = self._fill_budget(documents, flat, limit)
            threshold, mode = None, "budget"
        best = sorted(flat, key=lambda c: (-c.score, c.doc, c.index))
        for c in best:  # the min-keep rule: the context never ends up empty
            if len(chosen) >= self.min_keep:
                break
            chosen.add((c.doc, c.index))
        kept = _build(documents, per_doc, chosen)
        info: dict[str, object] = {
            "scorer": getattr(self.scorer, "name", "custom"), "mode": mode, "threshold": threshold,
            "token_limit": limit, "num_sentences": len(flat), "num_kept": len(chosen),
            "sentence_scores": {documents[i].id: [round(c.score, 4) for c in cands]
                                for i, cands in enumerate(per_doc)},
        }
        return kept, info

    def _fill_budget(self, documents: Sequence[Document], flat: list[Candidate], limit: int) -> set[tuple[int, int]]:
        """Highest-scoring sentences until the cap, checked on the assembled text (never over the cap)."""
        costs = self.counter.count_batch([documents[c.doc].text[c.start:c.end] for c in flat])
        chosen: list[Candidate] = []
        total = 0
        for cost, c in sorted(zip(costs, flat), key=lambda x: (-x[1].score, x[1].doc, x[1].index)):
            if total + cost <= limit:
                chosen.append(c)
                total += cost
        keys = {(c.doc, c.index) for c in chosen}
        # Joined sentences can tokenize differently from the sum of their parts: drop the weakest until it fits.
        while keys and self._count(documents, flat, keys) > limit:
            weakest = min((c for c in chosen if (c.doc, c.index) in keys), key=lambda c: (c.score, -c.doc, -c.index))
            keys.discard((weakest.doc, weakest.index))
        return keys

    def _count(self, documents: Sequence[Document], flat: list[Candidate], keys: set[tuple[int, int]]) -> int:
        """Tokens of the kept sentences as they will be assembled (joined by a space per document)."""
        pieces: dict[int, list[str]] = {}
        for c in flat:
            if (c.doc, c.index) in keys:
                pieces.setdefault(c.doc, []).append(documents[c.doc].text[c.start:c.end])
        return sum(self.counter.count_batch([" ".join(p) for p in pieces.values()]))


def _build(documents: Sequence[Document], per_doc: list[list[Candidate]],
           chosen: set[tuple[int, int]]) -> list[CompressedDocument]:
    out = []
    for d, cands in enumerate(per_doc):
        kept = [c for c in cands if (c.doc, c.index) in chosen]
        if kept:
            out.append(assemble(documents[d], [(c.start, c.end) for c in kept], sep=" ",
                                scores=[c.score for c in kept]))
    return out


def _weight(value: Any, name: str, default: float) -> float:
    weight = default if value in (None, "") else _number(value, name, float, minimum=0.0)
    if weight > 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {value!r}")
    return float(weight)


def _number(value: Any, name: str, kind: type, *, minimum: float | None = None) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a {kind.__name__}, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value!r}")
    return number
