"""Structure that token pruning must not break: code, Markdown tables, JSON, URLs, e-mails, numbers.

`structure_groups` groups word units into atoms that are kept or dropped *whole* — a code block, an inline code
span, a JSON value, a URL, an e-mail address, a number, a table's header with its alignment row, each table row —
and says which atom needs which (a table row needs its header), so whatever survives still parses.
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
}
_TABLE_ROW = re.compile(r"^[ \t]*\|.*\|[ \t]*$", re.M)
_TABLE_RULE = re.compile(r"^[ \t]*\|?[ \t]*:?-{2,}:?[ \t]*(?:\|[ \t]*:?-{2,}:?[ \t]*)*\|?[ \t]*$", re.M)
_JSON_OPEN = re.compile(r"[\[{]")


def units_touching(mask: np.ndarray, units: np.ndarray) -> np.ndarray:
    """[U] bool: units (char ranges [U, 2]) that contain at least one protected character."""
    if len(units) == 0:
        return np.zeros(0, dtype=bool)
    csum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    return (csum[units[:, 1]] - csum[units[:, 0]]) > 0


@dataclass(frozen=True, slots=True)
class Structure:
    """Word units of one text grouped into atoms.

    `group[u]` is unit u's atom (every unit outside structure is an atom of its own, numbered in text order);
    `requires[g]` is the atom that atom g needs kept with it (-1: none), e.g. a table row's header.
    """

    group: np.ndarray  # [U] int
    requires: np.ndarray  # [G] int


def json_spans(text: str) -> list[tuple[int, int]]:
    """Char spans of the JSON objects and non-empty arrays written in `text` (outermost only)."""
    decoder = json.JSONDecoder()
    out: list[tuple[int, int]] = []
    pos = 0
    while (m := _JSON_OPEN.search(text, pos)) is not None:
        start = m.start()
        try:
            value, end = decoder.raw_decode(text, start)  # parses in place: no copy per bracket
        except ValueError:
            pos = start + 1
            continue
        if (isinstance(value, dict) and value) or (isinstance(value, list) and len(value) > 1):
            out.append((start, end))
            pos = end
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
        return Structure(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    starts, ends = units[:, 0], units[:, 1]

    def unit_range(a: int, b: int) -> tuple[int, int] | None:
        lo = int(np.searchsorted(ends, a, side="right"))  # first unit ending after a
        hi = int(np.searchsorted(starts, b, side="left")) - 1  # last unit starting before b
        return (lo, hi) if lo <= hi else None

    ranges: list[tuple[int, int]] = []
    for pattern in _PATTERNS.values():
        for m in pattern.finditer(text):
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
    return Structure(group, requires)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out
