"""The JSONL compression contract, shared by the CLI, the HTTP API and distributed runners.

Input line: `{"id", "question"?, "contexts": [{"id"?, "title"?, "text"}]}` (the common data schema is valid).
Output: the input object plus `"compressed": {"method", "contexts": [{"id", "title", "text", "spans"}], "text",
"tokens_before", "tokens_after", "rate", "seconds", "stages"}` with spans as char offsets into the original text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from ragzip.budget import Budget
from ragzip.errors import InputError
from ragzip.types import CompressionResult, Document

MAX_LINE_BYTES = 64 * 1024 * 1024


class SupportsCompress(Protocol):
    def compress(self, query: str, documents: list[Document], budget: Budget | None = None) -> CompressionResult: ...


def parse_record(obj: Any) -> tuple[str, list[Document]]:
    """Validate one contract record; returns (question, documents). Context ids default to their position."""
    if not isinstance(obj, Mapping):
        raise InputError("expected a JSON object")
    question = obj.get("question", "")
    if question is None:
        question = ""
    if not isinstance(question, str):
        raise InputError("'question' must be a string")
    contexts = obj.get("contexts")
    if not isinstance(contexts, list):
        raise InputError("'contexts' must be a list")
    docs = []
    for i, ctx in enumerate(contexts):
        if not isinstance(ctx, Mapping) or not isinstance(ctx.get("text"), str):
            raise InputError(f"context {i} must be an object with a string 'text'")
        title = ctx.get("title") or ""
        if not isinstance(title, str):
            raise InputError(f"context {i}: 'title' must be a string")
        docs.append(Document(str(ctx.get("id", i)), ctx["text"], title))
    if len({d.id for d in docs}) != len(docs):
        raise InputError("context ids must be unique within a record")
    return question, docs


def compress_record(compressor: SupportsCompress, obj: Mapping[str, Any], budget: Budget | None,
                    source_line: int | None = None) -> dict[str, Any]:
    """The output object for one input record (`source_line` lets a rerun resume where it stopped)."""
    question, docs = parse_record(obj)
    compressed = compressor.compress(question, docs, budget).to_contract()
    if source_line is not None:
        compressed["source_line"] = source_line
    return {**obj, "compressed": compressed}


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
