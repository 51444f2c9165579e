"""The answer path: retrieve (optional) -> compress -> the answer prompt -> greedy decoding.

`ragzip ask`, the demo and the proxy's local backend all answer this way; the engine is a `LocalEngine` or a
`KVReuseEngine` (same prompt, same decoder, so the only difference is where the documents' KV comes from).

Example:
    >>> answerer = Answerer(LocalEngine(), build_compressor("exit"), retriever=Retriever.load("idx"), k=5)
    >>> result = answerer.context("Who wrote Hamlet?", budget=Budget.ratio(0.4))
    >>> print("".join(answerer.stream("Who wrote Hamlet?", result)))
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from ragzip.budget import Budget
from ragzip.compressors.base import Compressor
from ragzip.decoding import clean_answer
from ragzip.errors import ConfigError
from ragzip.types import CompressionResult, Document


class AnswerEngine(Protocol):
    """What both engines offer: the answer to a question from documents, streamed."""

    def stream(self, question: str, documents: Sequence[Document], *, max_new_tokens: int = 32,
               system: str | None = None, history: Sequence[dict[str, str]] = ()) -> Iterator[str]: ...


class Answerer:
    """One question's way from documents (given or retrieved) to an answer.

    Args:
        engine: a `LocalEngine` or a `KVReuseEngine`.
        compressor: any compressor or pipeline (`build_compressor("none")` keeps the context as it is).
        retriever: searched when `context` gets no documents.
        k: chunks to retrieve.
    """

    def __init__(self, engine: AnswerEngine, compressor: Compressor, *, retriever: Any = None, k: int = 5) -> None:
        self.engine = engine
        self.compressor = compressor
        self.retriever = retriever
        self.k = k

    def context(self, question: str, documents: Sequence[Document] | None = None,
                budget: Budget | None = None) -> CompressionResult:
        """The compressed context for `question`: `documents`, or the retriever's top `k` chunks."""
        if documents is None:
            if self.retriever is None:
                raise ConfigError("no documents given and no retriever to search")
            documents = [doc for doc, _ in self.retriever.search(question, self.k)]
        return self.compressor.compress(question, list(documents), budget)

    def stream(self, question: str, context: CompressionResult | Sequence[Document], *, max_new_tokens: int = 48,
               system: str | None = None, history: Sequence[dict[str, str]] = ()) -> Iterator[str]:
        """The answer's text as it is generated, from a compressed context (or documents as they are)."""
        docs = context.as_documents() if isinstance(context, CompressionResult) else list(context)
        return self.engine.stream(question, docs, max_new_tokens=max_new_tokens, system=system, history=history)

    def answer(self, question: str, context: CompressionResult | Sequence[Document], *,
               max_new_tokens: int = 48) -> str:
        return clean_answer("".join(self.stream(question, context, max_new_tokens=max_new_tokens)))


__all__ = ["AnswerEngine", "Answerer"]
