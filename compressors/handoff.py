"""One EXIT-encoder forward for a pipeline's EXIT stage and the lingua2 stage after it.

The lingua2 stage's relevance (sentence, answer-token and keep probabilities) comes from the EXIT encoder over
``[question][SEP]document``, the same forward the EXIT stage runs for its sentence scores. So the pipeline runs that
forward once, on the documents the EXIT stage receives (`QueryScorer` with EXIT's candidate spans: its sentence
probabilities are exactly the EXIT stage's own), gives the EXIT stage its sentence scores, and maps the token
probabilities onto the text the EXIT stage kept (every kept piece is a verbatim span of the original, so a token's
position maps through the piece's offsets). The lingua2 stage then reads its relevance from the map and runs no
forward; its words are judged in the context of the whole document rather than of what was kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ragzip.types import CompressedDocument, Document


@dataclass(frozen=True, slots=True)
class DocRelevance:
    """One document's relevance from the shared forward, in its original text's coordinates."""

    spans: tuple[tuple[int, int], ...]  # EXIT candidate spans
    sentences: tuple[float, ...]  # P(needed) per candidate span
    token_starts: np.ndarray  # [T] char starts, sorted
    answer: np.ndarray  # [T]
    keep: np.ndarray | None  # [T]


def stages_pair(first: Any, second: Any) -> bool:
    """Whether `first` (an EXIT stage) and `second` (a lingua2 stage) can share one forward (lingua2 is asked
    first: asking EXIT loads the relevance scorer)."""
    return bool(getattr(second, "takes_exit_relevance", False)) and bool(getattr(first, "shares_relevance", False))


def pairs(first: Any, second: Any, query: str) -> bool:
    """`stages_pair` for a request: only a question gives lingua2 a relevance to read."""
    return bool(query.strip()) and stages_pair(first, second)


def score(query: str, documents: Sequence[Document], spans_of: Any) -> list[DocRelevance]:
    """The shared forward for one request's documents (`spans_of`: EXIT's candidate spans of a document)."""
    return score_many([(query, documents)], spans_of)[0]


def score_many(jobs: Sequence[tuple[str, Sequence[Document]]], spans_of: Any) -> list[list[DocRelevance]]:
    """The shared forward for several requests, batched (`QueryScorer.score_many`)."""
    from ragzip.compressors.lingua2 import relevance_scorer

    inputs = [(q, [(d.title, d.text, spans_of(d)) for d in docs]) for q, docs in jobs]
    out = []
    for (_, docs), rel in zip(inputs, relevance_scorer().score_many(inputs)):
        out.append([DocRelevance(tuple(tuple(s) for s in spans), tuple(rel.sentences[d]), rel.token_starts[d],
                                 rel.token_probs[d], rel.token_keep[d] if rel.token_keep is not None else None)
                    for d, (_, _, spans) in enumerate(docs)])
    return out


def on_kept_text(kept: CompressedDocument, original: DocRelevance, sentence_spans: Sequence[tuple[int, int]]
                 ) -> tuple[list[float], np.ndarray, np.ndarray, np.ndarray | None]:
    """`original` mapped onto `kept` (whose `spans` are in the original text and `offsets` in `kept.text`): the
    probability of each of `sentence_spans` (sentences of the kept text: the best of the original candidate spans
    it came from, e.g. a table's rows) and the tokens that start inside kept pieces, at their kept-text positions."""
    pieces = [(a, b, s.start) for s, (a, b) in zip(kept.spans, kept.offsets)]
    starts = np.array([x for x, _ in original.spans], dtype=np.int64)

    def source(pos: int) -> int:
        for a, b, o in pieces:
            if a <= pos < b:
                return o + pos - a
        later = [o for a, _, o in pieces if a > pos]
        return later[0] if later else (pieces[-1][2] if pieces else 0)

    sentences = []
    for a, b in sentence_spans:  # the best candidate the sentence covers (a table block holds several lines)
        lo = int(np.searchsorted(starts, source(a), side="right")) - 1
        hi = int(np.searchsorted(starts, source(max(a, b - 1)), side="right")) - 1
        probs = original.sentences[max(0, lo): max(lo, hi) + 1]
        sentences.append(float(max(probs)) if len(probs) else 0.0)
    index, positions = [], []
    for a, b, o in pieces:
        lo, hi = np.searchsorted(original.token_starts, [o, o + (b - a)])
        index.extend(range(int(lo), int(hi)))
        positions.extend(int(t) - o + a for t in original.token_starts[lo:hi])
    idx = np.asarray(index, dtype=np.int64)
    order = np.argsort(np.asarray(positions, dtype=np.int64), kind="stable")
    keep = original.keep[idx][order] if original.keep is not None else None
    return sentences, np.asarray(positions, dtype=np.int64)[order], original.answer[idx][order], keep
