"""The two-verb façade: `RagZip(method).compress(query, documents, budget)`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ragzip.budget import Budget
from ragzip.contract import DocumentLike, to_documents, to_question
from ragzip.pipeline import build_compressor
from ragzip.tokens import TokenCounter, get_token_counter
from ragzip.types import CompressionResult


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
        self.counter = counter or get_token_counter(tokenizer)
        self.compressor = build_compressor(method, counter=self.counter, options=options)
        self.method = method

    def compress(self, query: str | None, documents: Sequence[DocumentLike],
                 budget: Budget | None = None) -> CompressionResult:
        """Compress `documents` (Documents, strings or `{"id"?, "title"?, "text"}` dicts) for `query`."""
        return self.compressor.compress(to_question(query), to_documents(documents), budget)

    def compress_batch(self, queries: Sequence[str | None], documents: Sequence[Sequence[DocumentLike]],
                       budget: Budget | None = None) -> list[CompressionResult]:
        return self.compressor.compress_batch([to_question(q) for q in queries],
                                              [to_documents(d) for d in documents], budget)


__all__ = ["RagZip", "to_documents"]
