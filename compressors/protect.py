"""Structure that token pruning must not break: code, Markdown tables, JSON, URLs, e-mails, numbers.

Two views of the same patterns:
* `protected_mask`: the characters inside protected spans (what `protect` used to force-keep);
* `structure_groups`: word units grouped into atoms that are kept or dropped *whole* — a code block, an inline
  code span, a JSON value, a URL, an e-mail address, a number, a table's header with its alignment row, each table
  row — plus which atom needs which (a table row needs its header), so whatever survives still parses.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

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


_ATOM_KINDS = ("code_fence", "inline_code", "url", "email", "number")
_JSON_OPEN = re.compile(r"[\[{]")
_MAX_JSON_CHARS = 200_000


@dataclass(frozen=True, slots=True)
class Structure:
    """Word units of one text grouped into atoms.

    `group[u]` is unit u's atom (every unit outside structure is an atom of its own, numbered in text order);
    `requires[g]` is the atom that atom g needs kept with it (-1: none), e.g. a table row's header.
    """

    group: np.ndarray  # [U] int
    requires: np.ndarray  # [G] int
    structured: np.ndarray  # [U] bool: the unit belongs to a multi-unit atom or a protected item


def json_spans(text: str) -> list[tuple[int, int]]:
    """Char spans of the JSON objects and non-empty arrays written in `text` (outermost only)."""
    decoder = json.JSONDecoder()
    out: list[tuple[int, int]] = []
    pos = 0
    while (m := _JSON_OPEN.search(text, pos)) is not None:
        start = m.start()
        try:
            value, end = decoder.raw_decode(text[start: start + _MAX_JSON_CHARS])
        except ValueError:
            pos = start + 1
            continue
        if (isinstance(value, dict) and value) or (isinstance(value, list) and len(value) > 1):
            out.append((start, start + end))
            pos = start + end
        else:
            pos = start + 1
    return out


def _table_atoms(text: str) -> list[tuple[tuple[int, int], list[tuple[int, int]]]]:
    """(header span incl. the alignment row, [row spans]) of each Markdown table."""
    rows = {r.start(): r for r in _TABLE_ROW.finditer(text)}
    tables = []
    for rule in _TABLE_RULE.finditer(text):
        header_start = text.rfind("\n", 0, max(0, rule.start() - 1)) + 1
        header = rows.get(header_start)
        if header is None or header.end() + 1 != rule.start():
            continue
        body, nxt = [], rule.end() + 1
        while nxt in rows:
            body.append((rows[nxt].start(), rows[nxt].end()))
            nxt = rows[nxt].end() + 1
        tables.append(((header.start(), rule.end()), body))
    return tables


def structure_groups(text: str, units: np.ndarray) -> Structure:
    """Atoms of the word units `units` ([U, 2] char ranges) of `text`; see `Structure`."""
    n = len(units)
    if n == 0:
        return Structure(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))
    starts, ends = units[:, 0], units[:, 1]

    def unit_range(a: int, b: int) -> tuple[int, int] | None:
        lo = int(np.searchsorted(ends, a, side="right"))  # first unit ending after a
        hi = int(np.searchsorted(starts, b, side="left")) - 1  # last unit starting before b
        return (lo, hi) if lo <= hi else None

    ranges: list[tuple[int, int]] = []
    for kind in _ATOM_KINDS:
        for m in _PATTERNS[kind].finditer(text):
            if (r := unit_range(m.start(), m.end())) is not None:
                ranges.append(r)
    ranges += [r for a, b in json_spans(text) if (r := unit_range(a, b)) is not None]
    tables = []
    for head, body in _table_atoms(text):
        h = unit_range(*head)
        rows = [r for a, b in body if (r := unit_range(a, b)) is not None]
        if h is not None:
            tables.append((h, rows))
            ranges += [h, *rows]
    # merge overlapping unit ranges into atoms (a number inside a code block joins the block)
    merged_id = np.full(n, -1, dtype=np.int64)
    structured = np.zeros(n, dtype=bool)
    for lo, hi in sorted(ranges):
        structured[lo: hi + 1] = True
    for lo, hi in _merge(ranges):
        merged_id[lo: hi + 1] = lo
    # atom ids in text order: a new atom starts at every unit not continuing the previous unit's merged range
    new_atom = np.ones(n, dtype=bool)
    new_atom[1:] = ~((merged_id[1:] >= 0) & (merged_id[1:] == merged_id[:-1]))
    group = np.cumsum(new_atom) - 1
    requires = np.full(int(group[-1]) + 1, -1, dtype=np.int64)
    for (h_lo, _), rows in tables:
        for r_lo, _ in rows:
            if group[r_lo] != group[h_lo]:
                requires[group[r_lo]] = group[h_lo]
    return Structure(group, requires, structured)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out
