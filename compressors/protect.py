"""Structural spans that token pruning must keep verbatim: code, Markdown tables, URLs, numbers, JSON keys."""

from __future__ import annotations

import re

import numpy as np

_PATTERNS: dict[str, re.Pattern[str]] = {
    # a fenced block up to its closing fence (or the end of the text when it is never closed)
    "code_fence": re.compile(r"^[ \t]*(```|~~~)[^\n]*\n.*?(?:^[ \t]*\1[ \t]*$|\Z)", re.M | re.S),
    "inline_code": re.compile(r"`[^`\n]+`"),
    "url": re.compile(r"(?:https?://|ftp://|www\.)[^\s<>\"'`]+[^\s<>\"'`.,;:!?)\]]"),
    "email": re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),
    "number": re.compile(r"[-+]?\$?\d[\d,.:/%]*"),
    "json_key": re.compile(r"\"[^\"\n]{1,80}\"\s*:"),
    "json_punct": re.compile(r"(?<!\w)[{}\[\]](?!\w)"),
}
_TABLE_ROW = re.compile(r"^[ \t]*\|.*\|[ \t]*$", re.M)
_TABLE_RULE = re.compile(r"^[ \t]*\|?[ \t]*:?-{2,}:?[ \t]*(?:\|[ \t]*:?-{2,}:?[ \t]*)*\|?[ \t]*$", re.M)

PROTECT_KINDS = (*_PATTERNS, "table")


def protected_mask(text: str, kinds: tuple[str, ...] = PROTECT_KINDS) -> np.ndarray:
    """[len(text)] bool: characters inside a protected span.

    Markdown tables keep their pipes, their header row and their alignment row, so that the table still parses
    after the cells' words are pruned; line breaks between rows survive because the pipes on both sides are kept.
    """
    mask = np.zeros(len(text) + 1, dtype=np.int32)  # difference array
    for kind in kinds:
        if kind == "table":
            _mark_tables(text, mask)
            continue
        for m in _PATTERNS[kind].finditer(text):
            mask[m.start()] += 1
            mask[m.end()] -= 1
    return np.cumsum(mask[:-1]) > 0


def _mark_tables(text: str, mask: np.ndarray) -> None:
    rules = list(_TABLE_RULE.finditer(text))
    rows = list(_TABLE_ROW.finditer(text))
    row_starts = [r.start() for r in rows]
    for rule in rules:
        mask[rule.start()] += 1
        mask[rule.end()] -= 1
        # the header is the row just above the alignment row
        prev_end = text.rfind("\n", 0, max(0, rule.start() - 1)) + 1
        if prev_end in row_starts:
            header = rows[row_starts.index(prev_end)]
            mask[header.start()] += 1
            mask[header.end()] -= 1
    for row in rows:
        for i in range(row.start(), row.end()):
            if text[i] == "|":
                mask[i] += 1
                mask[i + 1] -= 1


def units_touching(mask: np.ndarray, units: np.ndarray) -> np.ndarray:
    """[U] bool: units (char ranges [U, 2]) that contain at least one protected character."""
    if len(units) == 0:
        return np.zeros(0, dtype=bool)
    csum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    return (csum[units[:, 1]] - csum[units[:, 0]]) > 0
