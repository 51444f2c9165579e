"""The LlamaIndex postprocessor inside a real RetrieverQueryEngine: packaged embedder, local LLM, per-node
provenance."""

from __future__ import annotations

import llama_index.core  # noqa: E402, F401 - the llama-index extra, installed by setup
import pytest
from llama_index.core import Document, VectorStoreIndex  # noqa: E402
from llama_index.core.node_parser import SentenceSplitter  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode  # noqa: E402

from ragzip.llama_index import RagzipEmbedding, RagzipLLM, RagzipNodePostprocessor  # noqa: E402

TEXTS = {
    "eiffel": "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was designed by the company of Gustave "
              "Eiffel. It was completed in 1889. Bread is often sold near it.",
    "bread": "Bread is a staple food prepared from a dough of flour and water. It is usually baked. Many cultures "
             "eat bread every day.",
    "oxygen": "Oxygen is a chemical element with the symbol O. It has atomic number 8. It is a reactive nonmetal.",
}
QUESTION = "Who designed the Eiffel Tower?"


@pytest.fixture(scope="module")
def index() -> VectorStoreIndex:
    docs = [Document(text=t, id_=k, metadata={"source": f"{k}.txt", "title": k.title()}) for k, t in TEXTS.items()]
    return VectorStoreIndex.from_documents(docs, embed_model=RagzipEmbedding(),
                                           transformations=[SentenceSplitter(chunk_size=512)])


def test_in_a_retriever_query_engine_each_node_keeps_its_own_metadata(index: VectorStoreIndex) -> None:
    post = RagzipNodePostprocessor(method="exit", rate=0.4, tokenizer="whitespace")
    engine = RetrieverQueryEngine.from_args(index.as_retriever(similarity_top_k=3), llm=RagzipLLM(max_new_tokens=16),
                                            node_postprocessors=[post])
    response = engine.query(QUESTION)
    assert str(response).strip()
    sources = response.source_nodes
    assert sources and any("Gustave" in s.node.get_content() for s in sources)
    for s in sources:
        meta = s.node.metadata
        original = TEXTS[meta["title"].lower()]
        assert meta["source"] == f"{meta['title'].lower()}.txt"  # its own node's metadata, not a merge
        info = meta["ragzip"]
        assert info["method"] == "exit" and info["spans"]
        assert all(original[a:b] in s.node.get_content() for a, b in info["spans"])
        assert info["tokens_after"] <= info["tokens_before"]
        # provenance stays out of the prompt
        assert "spans" not in s.node.get_content(metadata_mode=MetadataMode.LLM)
    total_before = sum(s.node.metadata["ragzip"]["tokens_before"] for s in sources)
    assert sum(s.node.metadata["ragzip"]["tokens_after"] for s in sources) < total_before


def test_the_input_nodes_are_not_changed_and_scores_carry_over() -> None:
    nodes = [NodeWithScore(node=TextNode(text=t, id_=k, metadata={"k": k}), score=s)
             for (k, t), s in zip(TEXTS.items(), (0.9, 0.5, 0.1))]
    before = [(n.node.get_content(), dict(n.node.metadata)) for n in nodes]
    out = RagzipNodePostprocessor(method="embed-topk", target_tokens=20, tokenizer="whitespace").postprocess_nodes(
        nodes, query_str=QUESTION)
    assert [(n.node.get_content(), dict(n.node.metadata)) for n in nodes] == before
    assert out and sum(len(n.node.get_content().split()) for n in out) <= 20
    scores = {n.node.node_id: n.score for n in nodes}
    assert all(n.score == scores[n.node.node_id] for n in out)
    assert RagzipNodePostprocessor().postprocess_nodes([]) == []


