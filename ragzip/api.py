"""The two-verb façade: `RagZip(method).compress(query, documents, budget)`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ragzip.budget import Budget
from ragzip.errors import InputError
from ragzip.tokens import TokenCounter, get_token_counter
from ragzip.types import CompressionResult, Document


def to_documents(items: Sequence[Document | str | Mapping[str, Any]]) -> list[Document]:
    """Accept Documents, plain strings, or `{"id"?, "title"?, "text"}` dicts; ids default to the position."""
    if isinstance(items, (str, bytes)):
        raise InputError("documents must be a list, not a single string")
    docs = []
    for i, item in enumerate(items):
        if isinstance(item, Document):
            docs.append(item)
        elif isinstance(item, str):
            docs.append(Document(str(i), item))
        elif isinstance(item, Mapping):
            text = item.get("text")
            if not isinstance(text, str):
                raise InputError(f"document {i}: 'text' must be a string")
            title = item.get("title") or ""
            if not isinstance(title, str):
                raise InputError(f"document {i}: 'title' must be a string")
            meta = item.get("metadata") or {}
            docs.append(Document(str(item.get("id", i)), text, title, dict(meta) if isinstance(meta, Mapping) else {}))
        else:
            raise InputError(f"document {i}: expected a Document, str or dict, got {type(item).__name__}")
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        raise InputError("document ids must be unique")
    return docs


class RagZip:
    """Compress retrieved context with one method or a pipeline.

    Args:
        method: a registered compressor ("exit", "lingua2", "crag", "embed-topk", "truncate", "random", "none"),
            a '+'-joined pipeline ("crag+exit+lingua2"), or a path to a JSON pipeline config.
        tokenizer: the tokenizer that counts budgets (default: the local LLM's; "whitespace" counts words).
        **options: options of a single method (for pipelines: `{stage_name: {...}}`).

    Example:
        >>> rz = RagZip("exit")
        >>> result = rz.compress("Who wrote Hamlet?", ["Hamlet is a play by Shakespeare. Paris is in France."])
        >>> result.text
        'Hamlet is a play by Shakespeare.'
    """

    def __init__(self, method: str = "exit", *, tokenizer: str | None = None, counter: TokenCounter | None = None,
                 **options: Any) -> None:
        from ragzip.pipeline import build_compressor

        self.counter = counter or get_token_counter(tokenizer)
        self.compressor = build_compressor(method, counter=self.counter, options=options)
        self.method = method

    def compress(self, query: str, documents: Sequence[Document | str | Mapping[str, Any]],
                 budget: Budget | None = None) -> CompressionResult:
        return self.compressor.compress(query, to_documents(documents), budget)

    def compress_batch(self, queries: Sequence[str], documents: Sequence[Sequence[Document | str | Mapping[str, Any]]],
                       budget: Budget | None = None) -> list[CompressionResult]:
        return self.compressor.compress_batch(queries, [to_documents(d) for d in documents], budget)
