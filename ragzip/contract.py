"""The wire contract in one place: how documents, questions and records arrive, and what goes back.

Every surface (Python `RagZip`, the CLI, `/v1/compress`, the chat proxy, LangChain, `ragzip index`, `ragzip kv warm`)
turns its input into `Document`s here, so they accept and refuse the same things:

* a document is a `Document`, a plain string, or an object `{"id"?, "title"?, "text", "metadata"?}`; ids are strings
  or integers (kept as strings) and default to the position; ids must be unique within one request;
* a question is a string, or missing / null (no question); anything else is an InputError;
* a record is `{"id"?, "question"?, "contexts": [document, ...], ...}` (other keys pass through).

The answer is the record plus `"compressed"`: `CompressionResult.to_contract()`, whose contexts carry `id`, `title`,
`text`, `spans` (char offsets into the original text), `scores` (per kept unit, may be empty), `members` (the input
ids a merged piece stands for), `tokens_before` (of the input it replaces) and `tokens_after`; at the top level it
carries `method`, `text`, `tokens_before`, `tokens_after`, `rate`, `seconds`, `stages`, the `budget` applied
(`{"rate": 0.3}`, `{"auto": {"coverage": 0.95}}`, ...) and, for an auto budget, `auto`: `{"coverage",
"expected_coverage", "guard"}` (the calibrated coverage reached, and why the guard kept more, or null).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from ragzip.budget import Budget
from ragzip.errors import InputError
from ragzip.types import CompressionResult, Document

DocumentLike = Document | str | Mapping[str, Any]

# A lone UTF-16 surrogate is valid in a JSON string ("\\ud800") but is no Unicode text: no tokenizer or UTF-8
# encoder takes it, so it is refused where input arrives rather than failing deep inside a model.
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(value: str, where: str) -> str:
    """`value` unchanged, or an InputError naming `where` and the character position of a lone surrogate."""
    if not value.isascii():
        found = _SURROGATE.search(value)
        if found:
            raise InputError(f"{where}: lone UTF-16 surrogate {ascii(found.group())} at character {found.start()}; "
                             "text must be valid Unicode")
    return value


def check_strings(obj: Any, where: str = "body") -> None:
    """`check_text` over every string (keys included) of a parsed JSON value, naming the path of the first bad one."""
    if isinstance(obj, str):
        check_text(obj, where)
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            if isinstance(key, str):
                check_text(key, f"{where} (a key)")
            check_strings(value, f"{where}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_strings(value, f"{where}[{i}]")


class SupportsCompress(Protocol):
    def compress(self, query: str, documents: list[Document], budget: Budget | None = None) -> CompressionResult: ...


def to_document(item: DocumentLike, default_id: str, *, where: str = "document") -> Document:
    """One document from a `Document`, a string or a `{"id"?, "title"?, "text", "metadata"?}` mapping."""
    if isinstance(item, Document):
        check_text(item.text, f"{where}.text")
        check_text(item.title, f"{where}.title")
        return item
    if isinstance(item, str):
        return Document(default_id, check_text(item, where))
    if not isinstance(item, Mapping):
        raise InputError(f"{where}: expected a string or an object with a string 'text', got {type(item).__name__}")
    text = item.get("text")
    if not isinstance(text, str):
        raise InputError(f"{where}: 'text' must be a string")
    check_text(text, f"{where}.text")
    doc_id = item.get("id")
    if doc_id is None:
        doc_id = default_id
    elif isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise InputError(f"{where}: 'id' must be a string or an integer")
    elif isinstance(doc_id, str):
        check_text(doc_id, f"{where}.id")
    title = item.get("title")
    if title is None:
        title = ""
    elif not isinstance(title, str):
        raise InputError(f"{where}: 'title' must be a string")
    check_text(title, f"{where}.title")
    meta = item.get("metadata")
    if meta is not None and not isinstance(meta, Mapping):
        raise InputError(f"{where}: 'metadata' must be an object")
    return Document(str(doc_id), text, title, dict(meta or {}))


def to_documents(items: Iterable[DocumentLike], *, where: str = "documents",
                 default_ids: Sequence[str] | None = None) -> list[Document]:
    """Documents from any mix of the accepted forms; ids default to `default_ids[i]` or the position `i`.

    Raises:
        InputError: a single string instead of a list, a malformed item, or duplicate ids.
    """
    if isinstance(items, (str, bytes, Mapping)):
        raise InputError(f"{where} must be a list, not a single {type(items).__name__}")
    docs = []
    for i, item in enumerate(items):
        default = default_ids[i] if default_ids is not None else str(i)
        docs.append(to_document(item, default, where=f"{where}[{i}]"))
    seen: set[str] = set()
    for d in docs:
        if d.id in seen:
            raise InputError(f"{where}: document id {d.id!r} appears twice; ids must be unique")
        seen.add(d.id)
    return docs


def to_question(value: Any) -> str:
    """The question: a string, or "" when missing / null."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"'question' must be a string, got {type(value).__name__}")
    return check_text(value, "question")


def parse_record(obj: Any) -> tuple[str, list[Document]]:
    """Validate one contract record; returns (question, documents)."""
    if not isinstance(obj, Mapping):
        raise InputError("expected a JSON object")
    check_strings(obj, "record")  # other keys pass through to the output, which must be writable as UTF-8
    contexts = obj.get("contexts")
    if not isinstance(contexts, list):
        raise InputError("'contexts' must be a list")
    return to_question(obj.get("question")), to_documents(contexts, where="contexts")


def compress_record(compressor: SupportsCompress, obj: Mapping[str, Any], budget: Budget | None,
                    source_line: int | None = None) -> dict[str, Any]:
    """The output object for one input record (`source_line` lets a rerun resume where it stopped)."""
    question, docs = parse_record(obj)
    return record_row(obj, compressor.compress(question, docs, budget), source_line)


def record_row(obj: Mapping[str, Any], result: CompressionResult, source_line: int | None = None) -> dict[str, Any]:
    """The output object for one input record and its compression result."""
    compressed = result.to_contract()
    if source_line is not None:
        compressed["source_line"] = source_line
    return {**obj, "compressed": compressed}


def documents_of_line(obj: Any, line_id: str) -> list[Document]:
    """The documents of one corpus line: a record's `contexts` (ids `<record id>/<j>` by default) or one document
    (id `line_id` by default). What `ragzip index` and `ragzip kv warm` read."""
    if isinstance(obj, Mapping) and isinstance(obj.get("contexts"), list):
        base = str(obj.get("id", line_id))
        contexts = obj["contexts"]
        return to_documents(contexts, where="contexts", default_ids=[f"{base}/{j}" for j in range(len(contexts))])
    if isinstance(obj, Mapping) and "text" in obj:
        return [to_document(obj, line_id)]
    raise InputError("expected an object with a string 'text' or a 'contexts' list")


__all__ = ["DocumentLike", "SupportsCompress", "check_strings", "check_text", "compress_record", "documents_of_line",
           "parse_record", "record_row", "to_document", "to_documents", "to_question"]
