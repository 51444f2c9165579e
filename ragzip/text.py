"""Text utilities every layer shares: rule-based sentence splitting with character offsets (sentencex: maintained,
no runtime downloads; English rules, the language of the shipped models)."""

from __future__ import annotations

import re

_NONSPACE = re.compile(r"\S")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the sentences of `text`, whitespace trimmed, in order.

    Blank-line breaks always end a sentence. Spans never overlap and `text[start:end]` is the sentence.

    Example:
        >>> t = "It rained. We stayed in."
        >>> [t[a:b] for a, b in split_sentences(t)]
        ['It rained.', 'We stayed in.']
    """
    from sentencex import segment

    spans: list[tuple[int, int]] = []
    pos = 0
    for piece in segment("en", text):
        start = text.find(piece, pos)
        if start < 0:  # the splitter normalised something; fall back to the running position
            start = pos
        end = min(len(text), start + len(piece))
        pos = end
        spans.extend(_trim_lines(text, start, end))
    return spans


def _trim_lines(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Split a segment at blank lines and trim whitespace from each part."""
    out = []
    for m in re.finditer(r"(?:[^\n]|\n(?!\s*\n))+", text[start:end]):
        a, b = start + m.start(), start + m.end()
        first = _NONSPACE.search(text, a, b)
        if first is None:
            continue
        a = first.start()
        while b > a and text[b - 1].isspace():
            b -= 1
        out.append((a, b))
    return out
