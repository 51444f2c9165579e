"""Loaders for the common data schema (`normalized.jsonl[.gz]`, one example a line)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragzip.errors import InputError
from ragzip.types import Document

SCHEMA_FILES = ("normalized.jsonl", "normalized.jsonl.gz")


@dataclass(frozen=True, slots=True)
class Context:
    title: str
    text: str
    sentences: tuple[str, ...] | None = None
    is_supporting: bool | None = None
    supporting_sentence_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Example:
    id: str
    question: str
    answers: tuple[str, ...]
    contexts: tuple[Context, ...]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def documents(self) -> list[Document]:
        """The contexts as ragzip Documents, ids `"<example id>/<index>"` unless the context has its own."""
        docs = []
        for i, (ctx, raw) in enumerate(zip(self.contexts, self.raw.get("contexts", [{}] * len(self.contexts)))):
            doc_id = str(raw.get("id", f"{i}")) if isinstance(raw, dict) else str(i)
            docs.append(Document(doc_id, ctx.text, ctx.title))
        return docs


def sentence_spans(text: str, sentences: Sequence[str]) -> list[tuple[int, int]]:
    """Char spans (whitespace trimmed) of a dataset's own `sentences` inside `text`, located in order."""
    spans, pos = [], 0
    for sentence in sentences:
        start = text.find(sentence, pos)
        start = pos if start < 0 else start
        end = start + len(sentence)
        a, b = start, end
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        spans.append((a, b))
        pos = end
    return spans


def resolve_data_file(path: str | Path) -> Path:
    """`path` itself when it is a file, else the common-schema file inside the folder."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in SCHEMA_FILES:
            if (path / name).exists():
                return path / name
        raise InputError(f"{path} holds no {' or '.join(SCHEMA_FILES)}")
    raise InputError(f"data path {path} does not exist")


def _open_text(path: Path) -> Any:
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def iter_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, parsed object) for each non-blank JSONL line; a malformed line raises InputError."""
    file = resolve_data_file(path)
    with _open_text(file) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{file}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{file}:{lineno}: expected a JSON object")
            yield lineno, obj


def parse_example(obj: dict[str, Any], where: str = "") -> Example:
    contexts_raw = obj.get("contexts")
    if not isinstance(contexts_raw, list):
        raise InputError(f"{where}: 'contexts' must be a list")
    contexts = []
    for j, c in enumerate(contexts_raw):
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            raise InputError(f"{where}: context {j} must be an object with a string 'text'")
        sentences = c.get("sentences")
        contexts.append(Context(
            title=str(c.get("title") or ""),
            text=c["text"],
            sentences=tuple(sentences) if isinstance(sentences, list) else None,
            is_supporting=c.get("is_supporting"),
            supporting_sentence_ids=tuple(c.get("supporting_sentence_ids") or ()),
        ))
    answers = obj.get("answers") or []
    return Example(str(obj.get("id", where)), str(obj.get("question") or ""), tuple(map(str, answers)),
                   tuple(contexts), obj)


def load_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """Examples of a common-schema file (or a folder holding one), at most `limit` of them."""
    out = []
    for lineno, obj in iter_records(path):
        if limit is not None and len(out) >= limit:
            break
        out.append(parse_example(obj, f"line {lineno}"))
    return out
