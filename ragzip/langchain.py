"""LangChain integration (needs only `langchain-core`): a document compressor, a retriever wrapper, embeddings.

Example:
    >>> from langchain_core.vectorstores import InMemoryVectorStore
    >>> from ragzip.langchain import RagzipCompressor, RagzipEmbeddings, RagzipRetriever
    >>> store = InMemoryVectorStore.from_texts(texts, RagzipEmbeddings())
    >>> retriever = RagzipRetriever(base_retriever=store.as_retriever(search_kwargs={"k": 8}),
    ...                             compressor=RagzipCompressor(method="exit", rate=0.3))
    >>> docs = retriever.invoke("who designed the Eiffel Tower?")
    >>> docs[0].metadata["ragzip"]["spans"]
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun, Callbacks
from langchain_core.documents import BaseDocumentCompressor
from langchain_core.documents import Document as LCDocument
from langchain_core.embeddings import Embeddings
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from ragzip.budget import Budget
from ragzip.contract import to_documents
from ragzip.errors import InputError
from ragzip.pipeline import check_method
from ragzip.types import CompressionResult, Document


def to_ragzip(documents: Sequence[LCDocument]) -> list[Document]:
    """LangChain documents as ragzip Documents; ids from `doc.id`, `metadata["id"]` or the position (a repeated id
    gets `#<position>`, since LangChain does not promise unique ids)."""
    items, seen = [], set()
    for i, d in enumerate(documents):
        doc_id = str(d.id or d.metadata.get("id") or i)
        if doc_id in seen:
            doc_id = f"{doc_id}#{i}"
        seen.add(doc_id)
        items.append({"id": doc_id, "text": d.page_content, "title": str(d.metadata.get("title") or "")})
    return to_documents(items)


def contract_to_lc(compressed: Mapping[str, Any], documents: Sequence[LCDocument]) -> list[LCDocument]:
    """The contract's `compressed` object (local or from a server) as LangChain documents, each keeping the
    metadata of the input it came from plus `metadata["ragzip"]`."""
    by_id = {d.id: lc for lc, d in zip(documents, to_ragzip(documents))}
    out = []
    for ctx in compressed["contexts"]:
        members = ctx.get("members") or [ctx["id"]]
        lc = by_id.get(ctx["id"]) or by_id.get(members[0])
        meta = dict(lc.metadata) if lc is not None else {}
        scores = ctx.get("scores") or []
        meta["ragzip"] = {
            "method": compressed["method"], "spans": ctx["spans"], "scores": scores, "members": members,
            "tokens_before": ctx.get("tokens_before"), "tokens_after": ctx.get("tokens_after"),
            "query_rate": compressed["rate"], "query_budget": compressed.get("budget"),
        }
        if compressed.get("auto") is not None:
            meta["ragzip"]["query_auto"] = compressed["auto"]
        if scores:
            meta["relevance_score"] = max(scores)
        out.append(LCDocument(page_content=ctx["text"], metadata=meta, id=lc.id if lc is not None else None))
    return out


class RagzipCompressor(BaseDocumentCompressor):
    """Compress retrieved LangChain documents with any ragzip method or pipeline.

    Each returned Document keeps its metadata and gains `metadata["ragzip"]`: `spans` (char offsets into the
    original text), `scores` (per kept unit, when the method scores), `tokens_before`/`tokens_after` of that
    document, `method`, the query's achieved `query_rate`, its `query_budget` and (auto) `query_auto` (coverage
    target, expected coverage reached, guard). Never returns an empty list when documents came in.

    With `base_url` the work is done by a ragzip server (`POST {base_url}/v1/compress`), with real async I/O in
    `acompress_documents`; without it, compression runs in-process (async runs it in a worker thread).

    Args:
        method: compressor name, '+'-joined pipeline, or pipeline JSON path.
        rate / target_tokens / threshold / coverage: the budget (at most one; none: `auto`, the calibrated default;
            `coverage` sets auto's target, default 0.95).
        tokenizer: tokenizer that counts budgets (default: the local LLM's; "whitespace" counts words).
        options: compressor options.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    method: str = "exit"
    rate: float | None = None
    target_tokens: int | None = None
    threshold: float | None = None
    coverage: float | None = None
    tokenizer: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    base_url: str | None = None
    api_key: str | None = None
    timeout_s: float = 120.0

    _pipeline: Any = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _check(self) -> RagzipCompressor:
        """Names, options and budget checked when the component is built (no model loads until first use)."""
        check_method(self.method, self.options, self.budget)
        return self

    @property
    def budget(self) -> Budget:
        return Budget(rate=self.rate, target_tokens=self.target_tokens, threshold=self.threshold,
                      coverage=self.coverage)

    def _compressor(self) -> Any:
        from ragzip.api import RagZip

        if self._pipeline is None:
            self._pipeline = RagZip(self.method, tokenizer=self.tokenizer, **self.options)
        return self._pipeline

    def _local(self, documents: Sequence[LCDocument], query: str) -> list[LCDocument]:
        docs = to_ragzip(documents)
        with self._lock:  # tokenizers and embedders are not safe to share between threads
            result: CompressionResult = self._compressor().compress(query, docs, self.budget)
        return self._finish(contract_to_lc(result.to_contract(), documents), documents)

    def _request(self, documents: Sequence[LCDocument], query: str) -> tuple[dict[str, Any], dict[str, str]]:
        budget = {k: v for k, v in (("rate", self.rate), ("target_tokens", self.target_tokens),
                                    ("threshold", self.threshold), ("coverage", self.coverage)) if v is not None}
        body = {"question": query, "contexts": [{"id": d.id, "title": d.title, "text": d.text}
                                                for d in to_ragzip(documents)],
                "ragzip": {"method": self.method, **budget, **({"options": self.options} if self.options else {})}}
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return body, headers

    def _remote_result(self, data: dict[str, Any], documents: Sequence[LCDocument]) -> list[LCDocument]:
        return self._finish(contract_to_lc(data["compressed"], documents), documents)

    @staticmethod
    def _finish(out: list[LCDocument], documents: Sequence[LCDocument]) -> list[LCDocument]:
        if out or not documents:
            return out
        first = documents[0]  # nothing survived (e.g. all-empty texts): keep the first document as it was
        return [LCDocument(page_content=first.page_content, metadata={**first.metadata, "ragzip": {
            "method": "none", "spans": [[0, len(first.page_content)]], "scores": [], "fallback": "min_keep"}},
            id=first.id)]

    def compress_documents(self, documents: Sequence[LCDocument], query: str,
                           callbacks: Callbacks | None = None) -> Sequence[LCDocument]:
        """Compress `documents` for `query` (blocking)."""
        if not documents:
            return []
        if self.base_url is None:
            return self._local(documents, query)
        import httpx

        body, headers = self._request(documents, query)
        resp = httpx.post(f"{self.base_url.rstrip('/')}/v1/compress", json=body, headers=headers,
                          timeout=self.timeout_s)
        _raise_for(resp)
        return self._remote_result(resp.json(), documents)

    async def acompress_documents(self, documents: Sequence[LCDocument], query: str,
                                  callbacks: Callbacks | None = None) -> Sequence[LCDocument]:
        """Compress without blocking the event loop: an async HTTP call with `base_url`, else a worker thread."""
        if not documents:
            return []
        if self.base_url is None:
            return await asyncio.to_thread(self._local, documents, query)
        import httpx

        body, headers = self._request(documents, query)
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            resp = await client.post(f"{self.base_url.rstrip('/')}/v1/compress", json=body, headers=headers)
        _raise_for(resp)
        return self._remote_result(resp.json(), documents)


def _raise_for(resp: Any) -> None:
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:300]
        raise InputError(f"ragzip server returned {resp.status_code}: {message}")


class RagzipRetriever(BaseRetriever):
    """A retriever followed by a compressor (any `BaseDocumentCompressor`, e.g. `RagzipCompressor`)."""

    base_retriever: BaseRetriever
    compressor: BaseDocumentCompressor

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[LCDocument]:
        docs = self.base_retriever.invoke(query, config={"callbacks": run_manager.get_child()})
        return list(self.compressor.compress_documents(docs, query, callbacks=run_manager.get_child()))

    async def _aget_relevant_documents(self, query: str, *,
                                       run_manager: AsyncCallbackManagerForRetrieverRun) -> list[LCDocument]:
        docs = await self.base_retriever.ainvoke(query, config={"callbacks": run_manager.get_child()})
        return list(await self.compressor.acompress_documents(docs, query, callbacks=run_manager.get_child()))


class RagzipEmbeddings(Embeddings):
    """LangChain embeddings from ragzip's sentence embedder (default: the packaged all-MiniLM-L6-v2)."""

    def __init__(self, name: str | None = None) -> None:
        from ragzip.retrieval.embed import Embedder

        self.embedder = Embedder(name)
        self._lock = threading.Lock()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        with self._lock:
            return [list(map(float, row)) for row in self.embedder.encode(texts)]

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


__all__ = ["RagzipCompressor", "RagzipEmbeddings", "RagzipRetriever", "contract_to_lc", "to_ragzip"]
