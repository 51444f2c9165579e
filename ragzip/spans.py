"""Provenance helpers: build compressed text from source spans, and compose spans across pipeline stages."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ragzip.types import CompressedDocument, Document, Span


def assemble(
    doc: Document,
    pieces: Sequence[tuple[int, int]],
    *,
    sep: str = " ",
    scores: Sequence[float] = (),
    keep_line_breaks: bool = False,
) -> CompressedDocument:
    """Join `doc.text[start:end]` for each (start, end) piece with `sep`, recording where each piece landed.

    With `keep_line_breaks`, pieces whose source gap holds line breaks are joined by one line break (a blank line
    when the gap holds a paragraph break) instead of `sep`, so table rows, list items and code stay on their own
    lines (see `piece_separator`).
    """
    parts: list[str] = []
    spans: list[Span] = []
    offsets: list[tuple[int, int]] = []
    pos = 0
    prev_end = 0
    for start, end in pieces:
        piece = doc.text[start:end]
        if parts:
            gap = piece_separator(doc.text, prev_end, start, sep) if keep_line_breaks else sep
            if gap.isspace() and "\n" not in gap and not _spaced(doc.text, prev_end, start):
                gap = ""  # the source puts no space here (Chinese, Japanese, or a word's own pieces): add none
            parts.append(gap)
            pos += len(gap)
        prev_end = end
        parts.append(piece)
        spans.append(Span(doc.id, start, end))
        offsets.append((pos, pos + len(piece)))
        pos += len(piece)
    return CompressedDocument(doc.id, "".join(parts), doc.title, tuple(spans), tuple(offsets), scores=tuple(scores))


def _spaced(text: str, prev_end: int, start: int) -> bool:
    """Whether the source has whitespace where two kept pieces meet: right after the first or right before the
    second."""
    return (prev_end < len(text) and text[prev_end].isspace()) or (start > 0 and text[start - 1].isspace())


_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")


def piece_separator(text: str, prev_end: int, start: int, sep: str = " ") -> str:
    """What joins two kept pieces: a blank line when the source gap between them holds one (a paragraph break),
    one line break when it holds only single ones (the rows of one table or lines of one block stay one block,
    however many lines were dropped between them), else `sep`."""
    gap = text[prev_end:start]
    if "\n" not in gap:
        return sep
    return "\n\n" if _BLANK_LINE.search(gap) else "\n"


def compose(previous: CompressedDocument, current: CompressedDocument) -> CompressedDocument:
    """Map `current` (whose spans point into `previous.text`) back to the original document's offsets.

    A current span that crosses pieces of `previous` splits into one source span per piece; characters that were
    separators (not source text) carry no provenance. A piece with `members` but no spans (an abstractive summary)
    keeps its members; an extractive piece with both (a CRAG representative) keeps both.
    """
    if (current.members and not current.spans) or not previous.spans:
        return CompressedDocument(current.id, current.text, current.title or previous.title, (), (),
                                  current.members or previous.members, current.scores)
    spans: list[Span] = []
    offsets: list[tuple[int, int]] = []
    for span, (out_start, _out_end) in zip(current.spans, current.offsets):
        for src, (p_start, p_end) in zip(previous.spans, previous.offsets):
            lo, hi = max(span.start, p_start), min(span.end, p_end)
            if lo >= hi:
                continue
            shift = out_start + (lo - span.start)
            spans.append(Span(src.doc_id, src.start + (lo - p_start), src.start + (hi - p_start)))
            offsets.append((shift, shift + (hi - lo)))
    return CompressedDocument(current.id, current.text, current.title or previous.title, tuple(spans), tuple(offsets),
                              current.members or previous.members, current.scores)
