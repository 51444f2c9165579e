from __future__ import annotations

from ragzip.budget import Budget
from ragzip.compressors.registry import get_compressor
from ragzip.tokens import WhitespaceCounter
from ragzip.types import Document

DOCS = [Document("a", "Oxygen is element eight. It is a gas. Plants make it."),
        Document("b", "The Rhine ends in the North Sea. Paris is in France.")]


def test_random_is_seeded_by_query() -> None:
    c = get_compressor("random", counter=WhitespaceCounter())
    one = c.compress("q1", DOCS, Budget.ratio(0.5)).text
    assert one == c.compress("q1", DOCS, Budget.ratio(0.5)).text
    assert {c.compress(f"q{i}", DOCS, Budget.ratio(0.5)).text for i in range(8)} != {one}


def test_embed_topk_prefers_relevant_sentences() -> None:
    c = get_compressor("embed-topk", counter=WhitespaceCounter())
    result = c.compress("Where does the Rhine end?", DOCS, Budget.tokens(8))
    assert "North Sea" in result.text and result.tokens_after <= 8
    assert [d.id for d in result.documents] == ["b"]  # documents with nothing kept are dropped
    scores = result.documents[0].scores
    assert len(scores) == len(result.documents[0].spans)


def test_truncate_keeps_the_head() -> None:
    c = get_compressor("truncate", counter=WhitespaceCounter())
    assert c.compress("", DOCS, Budget.tokens(4)).text == "Oxygen is element eight."
