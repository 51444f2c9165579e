"""JSONL files of the compression contract (`ragzip.contract`): reading, resuming, repairing a partial line.

Input line: `{"id", "question"?, "contexts": [{"id"?, "title"?, "text"}]}` (the common data schema is valid).
Output: the input object plus `"compressed": {"method", "contexts": [{"id", "title", "text", "spans"}], "text",
"tokens_before", "tokens_after", "rate", "seconds", "stages"}` with spans as char offsets into the original text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ragzip.contract import SupportsCompress, compress_record, documents_of_line, parse_record
from ragzip.errors import InputError
from ragzip.types import Document

MAX_LINE_BYTES = 64 * 1024 * 1024


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed object or None, error or None) for each non-blank line."""
    with open(path, encoding="utf-8", errors="strict") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if len(line) > MAX_LINE_BYTES:
                yield lineno, None, f"line is larger than {MAX_LINE_BYTES} bytes"
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield lineno, None, f"invalid JSON: {exc.msg} (column {exc.colno})"


def done_lines(output: str | Path) -> set[int]:
    """Input line numbers already written to `output` (for --resume); a partial last line does not count."""
    lines: set[int] = set()
    path = Path(output)
    if not path.exists():
        return lines
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            source_line = obj.get("compressed", {}).get("source_line") if isinstance(obj, dict) else None
            if isinstance(source_line, int):
                lines.add(source_line)
    return lines


def truncate_partial_line(path: str | Path) -> None:
    """Drop a partial last line left by an interrupted run so that appends start on a fresh line."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return
        fh.truncate(data.rfind(b"\n") + 1)


def read_corpus(path: str | Path) -> list[Document]:
    """Every document of a corpus JSONL (`{"id"?, "title"?, "text"}` lines, or records whose `contexts` are the
    documents), for `ragzip index` and `ragzip kv warm`. A bad line is an InputError naming `path:line`."""
    docs: list[Document] = []
    for lineno, obj, problem in iter_jsonl(path):
        try:
            if problem:
                raise InputError(problem)
            docs.extend(documents_of_line(obj, str(lineno)))
        except InputError as exc:
            raise InputError(f"{path}:{lineno}: {exc}") from None
    return docs


__all__ = ["MAX_LINE_BYTES", "SupportsCompress", "compress_record", "done_lines", "iter_jsonl", "parse_record",
           "read_corpus", "truncate_partial_line"]
