"""The two-verb façade: `RagZip(method).compress(query, documents, budget)`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from ragzip.budget import BudgetLike
from ragzip.compressors.base import CompressionRequest, RequestLike, batch_requests, compress_many
from ragzip.contract import DocumentLike, to_documents
from ragzip.pipeline import build_compressor
from ragzip.tokens import TokenCounter, get_token_counter
from ragzip.types import CompressionResult


class RagZip:
    """Compress retrieved context with one method or a pipeline.

    Args:
        method: a registered compressor ("exit", "lingua2", "crag", "embed-topk", "truncate", "random", "none"),
            a '+'-joined pipeline ("crag+exit+lingua2"), or a path to a JSON pipeline config.
        tokenizer: the tokenizer that counts budgets (default: the local LLM's; "whitespace" counts words;
            "cl100k_base" or an OpenAI model name counts as tiktoken does).
        device: where model-backed methods run: "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:N"
            (a method's own `device` option wins).
        **options: options of a single method (for pipelines: `{stage_name: {...}}`).

    Example:
        >>> rz = RagZip("exit")
        >>> result = rz.compress("Who wrote Hamlet?", ["Hamlet is a play by Shakespeare. Paris is in France."])
        >>> result.text
        'Hamlet is a play by Shakespeare.'
    """

    def __init__(self, method: str = "exit", *, tokenizer: str | None = None, counter: TokenCounter | None = None,
                 device: str | None = None, **options: Any) -> None:
        self.counter = counter or get_token_counter(tokenizer)
        self.compressor = build_compressor(method, counter=self.counter, options=options, device=device)
        self.method = method
        self._lock = threading.Lock()  # one compression at a time: tokenizers and encoders are not thread-safe

    def compress(self, query: str | None, documents: Sequence[DocumentLike], budget: BudgetLike = None, *,
                 rate: float | None = None, target_tokens: int | None = None,
                 threshold: float | None = None, coverage: float | None = None) -> CompressionResult:
        """Compress `documents` (Documents, strings or `{"id"?, "title"?, "text"}` dicts) for `query` (a string, or
        None for no question).

        The budget is a `Budget`, a bare rate (`0.3`), a bare token cap (`512`), `"auto"`, or one of the `rate=`,
        `target_tokens=`, `threshold=`, `coverage=` keywords; none means the method's default: `auto` (keep until the
        calibrated expected coverage of the needed evidence reaches 0.95) for EXIT, lingua2 and their pipelines, a
        pipeline file's own budget where it has one. With a rate or token cap (or auto's `max_tokens`),
        `count(result.text) <= limit` holds, separators included.

        Raises:
            InputError: a malformed document or question. BudgetError: a malformed budget, or a budget kind the
            method does not take.
        """
        with self._lock:
            return self.compressor.compress(query, documents, budget, rate=rate, target_tokens=target_tokens,
                                            threshold=threshold, coverage=coverage)

    async def acompress(self, query: str | None, documents: Sequence[DocumentLike], budget: BudgetLike = None, *,
                        rate: float | None = None, target_tokens: int | None = None,
                        threshold: float | None = None, coverage: float | None = None) -> CompressionResult:
        """`compress` for async applications: it runs in a worker thread, so the event loop keeps serving while
        the models work. Concurrent calls on one `RagZip` run one after another."""
        return await asyncio.to_thread(self.compress, query, documents, budget, rate=rate,
                                       target_tokens=target_tokens, threshold=threshold, coverage=coverage)

    def compress_many(self, requests: Sequence[RequestLike], *, return_exceptions: bool = False) -> list[Any]:
        """Compress several independent requests (`CompressionRequest`s or `(query, documents[, budget])` tuples)
        with their encoder forwards batched together; each result is what `compress` returns for that request.

        With `return_exceptions`, a request that fails (a malformed document, a budget the method refuses) holds its
        exception in its slot and the others are still compressed; otherwise the first failure raises.

        Example:
            >>> rz.compress_many([("Who wrote Hamlet?", docs_a), ("Where is Paris?", docs_b, 0.5)])
        """
        with self._lock:
            return compress_many(self.compressor, requests, return_exceptions=return_exceptions)

    def compress_batch(self, queries: Sequence[str | None], documents: Sequence[Sequence[DocumentLike]],
                       budget: BudgetLike = None) -> list[CompressionResult]:
        """`compress_many` for one budget: one result per (query, documents) pair."""
        return self.compress_many(batch_requests(queries, documents, budget))


__all__ = ["CompressionRequest", "RagZip", "to_documents"]
