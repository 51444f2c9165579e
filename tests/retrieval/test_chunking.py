from __future__ import annotations

import pytest

from ragzip.errors import ConfigError
from ragzip.retrieval.chunking import chunk_document, chunk_text
from ragzip.tokens import WhitespaceCounter
from ragzip.types import Document

TEXT = ("The Rhine rises in the Swiss Alps. It flows north through Germany. "
        "It reaches the North Sea in the Netherlands. " + " ".join(["word"] * 30) + ". Short end.")


def test_chunks_keep_char_offsets_and_token_limit() -> None:
    counter = WhitespaceCounter()
    chunks = chunk_text(TEXT, counter, max_tokens=12)
    assert len(chunks) > 2
    for c in chunks:
        assert TEXT[c.start:c.end] == c.text
        assert c.num_tokens <= 12
        assert counter.count(c.text) <= 12
    # every word of the source is in some chunk, in order
    assert " ".join(c.text for c in chunks).split() == TEXT.split()


def test_real_tokenizer_limit() -> None:
    from ragzip.tokens import get_token_counter

    counter = get_token_counter(None)
    for c in chunk_text(TEXT * 3, counter, max_tokens=20):
        assert counter.count(c.text) <= 20 + 2  # joining may change a boundary token at most slightly


def test_chunk_document_ids_and_metadata() -> None:
    chunks = chunk_document(Document("doc", TEXT, "Rhine"), WhitespaceCounter(), max_tokens=12)
    assert chunks[0].id == "doc#0" and chunks[0].title == "Rhine"
    for c in chunks:
        assert TEXT[c.metadata["start"]:c.metadata["end"]] == c.text


def test_bad_limits() -> None:
    with pytest.raises(ConfigError):
        chunk_text(TEXT, WhitespaceCounter(), max_tokens=0)
