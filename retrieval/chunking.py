"""Token-aware chunking that keeps character offsets into the source text."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ragzip.errors import ConfigError
from ragzip.text import split_sentences
from ragzip.tokens import TokenCounter
from ragzip.types import Document

_WORD = re.compile(r"\S+")


@dataclass(frozen=True, slots=True)
class Chunk:
    """`text == source[start:end]`."""

    start: int
    end: int
    text: str
    num_tokens: int


def chunk_text(text: str, counter: TokenCounter, *, max_tokens: int = 256) -> list[Chunk]:
    """Pack whole sentences into chunks of at most `max_tokens`; a longer sentence is cut at word boundaries.

    Token counts are per-piece sums, an upper-bound-ish estimate of the joined count (joining may merge tokens).
    """
    if max_tokens <= 0:
        raise ConfigError(f"max_tokens must be positive, got {max_tokens}")
    pieces: list[tuple[int, int]] = []
    sentences = split_sentences(text)
    sent_costs = counter.count_batch([text[a:b] for a, b in sentences])
    for (a, b), cost in zip(sentences, sent_costs):
        if cost <= max_tokens:
            pieces.append((a, b))
        else:
            pieces.extend(_split_long(text, a, b, counter, max_tokens))
    costs = counter.count_batch([text[a:b] for a, b in pieces])
    chunks: list[Chunk] = []
    i = 0
    while i < len(pieces):
        j, total = i, 0
        while j < len(pieces) and (j == i or total + costs[j] <= max_tokens):
            total += costs[j]
            j += 1
        start, end = pieces[i][0], pieces[j - 1][1]
        chunks.append(Chunk(start, end, text[start:end], total))
        i = j
    return chunks


def _split_long(text: str, start: int, end: int, counter: TokenCounter, max_tokens: int) -> list[tuple[int, int]]:
    words = [(start + m.start(), start + m.end()) for m in _WORD.finditer(text[start:end])]
    costs = counter.count_batch([text[a:b] for a, b in words])
    out, i = [], 0
    while i < len(words):
        j, total = i, 0
        while j < len(words) and (j == i or total + costs[j] <= max_tokens):
            total += costs[j]
            j += 1
        out.append((words[i][0], words[j - 1][1]))
        i = j
    return out


def chunk_document(doc: Document, counter: TokenCounter, *, max_tokens: int = 256) -> list[Document]:
    """Chunks of `doc` as Documents with ids `<doc id>#<n>` and their source offsets in metadata."""
    return [
        Document(f"{doc.id}#{n}", c.text, doc.title,
                 {**doc.metadata, "source_id": doc.id, "start": c.start, "end": c.end})
        for n, c in enumerate(chunk_text(doc.text, counter, max_tokens=max_tokens))
    ]
