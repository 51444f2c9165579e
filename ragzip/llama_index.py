"""LlamaIndex integration (needs `llama-index-core`, the `ragzip[llama-index]` extra): a node postprocessor that
compresses retrieved nodes, and the packaged embedder and local LLM as LlamaIndex components for offline use.

Example:
    >>> from llama_index.core import Document, VectorStoreIndex
    >>> from ragzip.llama_index import RagzipEmbedding, RagzipLLM, RagzipNodePostprocessor
    >>> index = VectorStoreIndex.from_documents(docs, embed_model=RagzipEmbedding())
    >>> engine = index.as_query_engine(llm=RagzipLLM(), similarity_top_k=8,
    ...                                node_postprocessors=[RagzipNodePostprocessor(method="exit", rate=0.3)])
    >>> response = engine.query("Who designed the Eiffel Tower?")
    >>> response.source_nodes[0].node.metadata["ragzip"]["spans"]

Unlike LlamaIndex's own LongLLMLingua postprocessor, which returns one node carrying the metadata of every input,
each output node here is a copy of its own input node (id, metadata, relationships, score) with the kept text and
`metadata["ragzip"]`: `spans` (char offsets into the original text), `scores`, `tokens_before`/`tokens_after`,
`members` (the input nodes a CRAG cluster stands for), `method`. That key is excluded from what the LLM and the
embedder see, so provenance costs no prompt tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.types import CompletionResponse, CompletionResponseGen, LLMMetadata
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
from pydantic import Field, PrivateAttr, model_validator

from ragzip.budget import Budget
from ragzip.contract import to_documents
from ragzip.pipeline import check_method
from ragzip.types import CompressionResult

PROVENANCE_KEY = "ragzip"


class RagzipNodePostprocessor(BaseNodePostprocessor):
    """Compress retrieved nodes with any ragzip method or pipeline under one budget for the query.

    Args:
        method: compressor name, '+'-joined pipeline, or pipeline JSON path.
        rate / target_tokens / threshold / coverage: the budget (at most one; none: the method's default, `auto` for
            the calibrated methods; `coverage` sets auto's target, default 0.95).
        tokenizer: what budgets are counted in (default: the local LLM's; "cl100k_base" for a GPT-class LLM).
        options: compressor options. device: "auto" (cuda when available), "cpu", "cuda", ...
    """

    method: str = "exit"
    rate: float | None = None
    target_tokens: int | None = None
    threshold: float | None = None
    coverage: float | None = None
    tokenizer: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    device: str | None = None

    _pipeline: Any = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _check(self) -> RagzipNodePostprocessor:
        """Names, options and budget checked when the component is built (no model loads until first use)."""
        check_method(self.method, self.options, self.budget)
        return self

    @classmethod
    def class_name(cls) -> str:
        return "RagzipNodePostprocessor"

    @property
    def budget(self) -> Budget:
        return Budget(rate=self.rate, target_tokens=self.target_tokens, threshold=self.threshold,
                      coverage=self.coverage)

    def _compressor(self) -> Any:
        from ragzip.api import RagZip

        if self._pipeline is None:
            self._pipeline = RagZip(self.method, tokenizer=self.tokenizer, device=self.device, **self.options)
        return self._pipeline

    def _postprocess_nodes(self, nodes: list[NodeWithScore],
                           query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        if not nodes:
            return []
        ids, seen = [], set()
        for i, n in enumerate(nodes):  # LlamaIndex ids are meant to be unique; a repeat gets its position
            node_id = n.node.node_id if n.node.node_id not in seen else f"{n.node.node_id}#{i}"
            seen.add(node_id)
            ids.append(node_id)
        docs = to_documents([{"id": node_id, "text": n.node.get_content(metadata_mode=MetadataMode.NONE),
                              "title": str(n.node.metadata.get("title") or "")} for node_id, n in zip(ids, nodes)])
        query = query_bundle.query_str if query_bundle is not None else None
        with self._lock:  # tokenizers and embedders are not safe to share between threads
            result: CompressionResult = self._compressor().compress(query, docs, self.budget)
        by_id = dict(zip(ids, nodes))
        out = []
        for ctx in result.to_contract()["contexts"]:
            members = ctx.get("members") or [ctx["id"]]
            source = by_id.get(ctx["id"]) or by_id[members[0]]
            out.append(_compressed_node(source, ctx, members, result))
        return out


def _compressed_node(source: NodeWithScore, ctx: dict[str, Any], members: list[str],
                     result: CompressionResult) -> NodeWithScore:
    """A copy of `source`'s node holding the kept text and its provenance; the original node is not changed."""
    node = source.node.model_copy(deep=True)
    node.set_content(ctx["text"])
    node.metadata[PROVENANCE_KEY] = {
        "method": result.method, "spans": ctx["spans"], "scores": ctx.get("scores") or [], "members": members,
        "tokens_before": ctx.get("tokens_before"), "tokens_after": ctx.get("tokens_after"),
        "query_rate": result.rate, "query_budget": dict(result.budget),
        **({"query_auto": result.auto} if result.auto is not None else {}),
    }
    for excluded in (node.excluded_llm_metadata_keys, node.excluded_embed_metadata_keys):
        if PROVENANCE_KEY not in excluded:
            excluded.append(PROVENANCE_KEY)
    return NodeWithScore(node=node, score=source.score)


class RagzipEmbedding(BaseEmbedding):
    """ragzip's sentence embedder (default: the packaged all-MiniLM-L6-v2, offline) as a LlamaIndex embedding."""

    name: str | None = None
    device: str | None = "auto"
    _embedder: Any = PrivateAttr(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "RagzipEmbedding"

    def _model(self) -> Any:
        if self._embedder is None:
            from ragzip.retrieval.embed import Embedder

            self._embedder = Embedder(self.name, device=self.device)
        return self._embedder

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return [[float(x) for x in row] for row in self._model().encode(texts)]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._get_text_embeddings([text])[0]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._get_text_embedding(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)


class RagzipLLM(CustomLLM):
    """A local ragzip LLM (default: the embedded SmolLM2-135M-Instruct; any alias, path or Hugging Face name) as
    a LlamaIndex LLM, greedy decoding, for offline pipelines and tests."""

    model: str | None = None
    device: str | None = "auto"
    max_new_tokens: int = 64
    _engine: Any = PrivateAttr(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "RagzipLLM"

    def _local(self) -> Any:
        if self._engine is None:
            from ragzip.engine import LocalEngine

            self._engine = LocalEngine(self.model, device=self.device)
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name=self.model or "smollm2-135m-instruct", num_output=self.max_new_tokens,
                           is_chat_model=False)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        text = "".join(self._deltas(prompt))
        return CompletionResponse(text=text.strip())

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        def gen() -> CompletionResponseGen:
            text = ""
            for delta in self._deltas(prompt):
                text += delta
                yield CompletionResponse(text=text, delta=delta)
        return gen()

    def _deltas(self, prompt: str) -> Sequence[str] | Any:
        return self._local().stream_chat([{"role": "user", "content": prompt}], max_new_tokens=self.max_new_tokens)


__all__ = ["PROVENANCE_KEY", "RagzipEmbedding", "RagzipLLM", "RagzipNodePostprocessor"]
