"""The LangChain compressor and retriever wrapper, with a real langchain-core vector store."""

from __future__ import annotations

import asyncio

import pytest
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import Document
from langchain_core.vectorstores import InMemoryVectorStore

from ragzip.langchain import RagzipCompressor, RagzipEmbeddings, RagzipRetriever

TEXTS = [
    "The Eiffel Tower is in Paris. It was designed by Gustave Eiffel's company. It opened in 1889.",
    "Bread is made from flour and water. It is baked in an oven. Many cultures eat bread daily.",
    "Oxygen has the atomic number 8. It is a reactive nonmetal. Oxygen is abundant in the universe.",
    "The Louvre is a museum in Paris. It holds the Mona Lisa. It is the most visited museum in the world.",
]


@pytest.fixture(scope="module")
def store() -> InMemoryVectorStore:
    return InMemoryVectorStore.from_texts(TEXTS, RagzipEmbeddings(),
                                          metadatas=[{"title": f"t{i}", "source": i} for i in range(len(TEXTS))])


def test_compressor_metadata_spans_scores_and_counts() -> None:
    docs = [Document(page_content=t, metadata={"title": f"t{i}", "source": i}) for i, t in enumerate(TEXTS)]
    comp = RagzipCompressor(method="embed-topk", rate=0.3, tokenizer="whitespace")
    out = comp.compress_documents(docs, "Who designed the Eiffel Tower?")
    assert 0 < len(out) <= len(docs)
    for d in out:
        meta = d.metadata["ragzip"]
        src = TEXTS[d.metadata["source"]]
        assert " ".join(src[a:b] for a, b in meta["spans"]) == d.page_content  # spans point into the original
        assert len(meta["scores"]) == len(meta["spans"]) and d.metadata["relevance_score"] == max(meta["scores"])
        assert meta["tokens_after"] == len(d.page_content.split()) <= meta["tokens_before"] == len(src.split())
    assert "Gustave" in " ".join(d.page_content for d in out)
    kept = sum(d.metadata["ragzip"]["tokens_after"] for d in out)
    assert kept <= 0.3 * sum(len(t.split()) for t in TEXTS)


def test_never_empty_and_async_matches_sync() -> None:
    comp = RagzipCompressor(method="truncate", target_tokens=1, tokenizer="whitespace")
    docs = [Document(page_content=t) for t in TEXTS[:2]]
    sync = comp.compress_documents(docs, "q")
    assert len(sync) == 1 and sync[0].page_content == "The"
    assert [d.page_content for d in asyncio.run(comp.acompress_documents(docs, "q"))] == ["The"]
    empty = comp.compress_documents([Document(page_content="")], "q")
    assert len(empty) == 1 and empty[0].metadata["ragzip"]["fallback"] == "min_keep"
    assert comp.compress_documents([], "q") == []


def test_retriever_wrapper_over_vector_store(store: InMemoryVectorStore) -> None:
    retriever = RagzipRetriever(base_retriever=store.as_retriever(search_kwargs={"k": 3}),
                                compressor=RagzipCompressor(method="embed-topk", rate=0.4, tokenizer="whitespace"))
    docs = retriever.invoke("Which museum holds the Mona Lisa?")
    assert docs and "Mona Lisa" in " ".join(d.page_content for d in docs)
    adocs = asyncio.run(retriever.ainvoke("Which museum holds the Mona Lisa?"))
    assert [d.page_content for d in adocs] == [d.page_content for d in docs]


def test_contextual_compression_retriever_from_langchain_classic(store: InMemoryVectorStore) -> None:
    retriever = ContextualCompressionRetriever(  # the `langchain` extra installs langchain-classic: no skip
        base_compressor=RagzipCompressor(method="embed-topk", target_tokens=12, tokenizer="whitespace"),
        base_retriever=store.as_retriever(search_kwargs={"k": 2}))
    docs = retriever.invoke("What is the atomic number of oxygen?")
    assert docs and sum(len(d.page_content.split()) for d in docs) <= 12
    assert "8" in " ".join(d.page_content for d in docs)
