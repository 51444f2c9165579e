"""No budget means auto on every surface: Python, the CLI, /v1/compress, the chat proxy, LangChain, LlamaIndex and
the LLMLingua drop-in all report `{"auto": {"coverage": 0.95}}` and what it reached; `coverage` sets the target."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
from langchain_core.documents import Document as LCDocument
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from typer.testing import CliRunner

from ragzip import RagZip
from ragzip.cli import app as cli_app
from ragzip.langchain import RagzipCompressor
from ragzip.llama_index import RagzipNodePostprocessor
from ragzip.llmlingua import PromptCompressor
from ragzip.server.app import create_app
from ragzip.server.config import ServerConfig

from .test_surfaces import recording_upstream

QUESTION = "Where does the Rhine end?"
CONTEXTS = [
    {"id": "r", "title": "Rhine", "text": "The Rhine rises in the Swiss Alps. The Rhine ends in the North Sea near "
                                          "Rotterdam. It is one of the longest rivers of Europe."},
    {"id": "p", "title": "Paris", "text": "Paris is the capital of France. The Louvre is the largest art museum. "
                                          "Paris hosted the Olympics."},
    {"id": "k", "title": "Kangaroo", "text": "Kangaroos live in Australia. They carry their young in a pouch. A "
                                             "group is called a mob."},
]
DEFAULT = {"auto": {"coverage": 0.95}}


def _check_auto(compressed: dict[str, Any], coverage: float = 0.95) -> None:
    assert compressed["budget"] == {"auto": {"coverage": coverage}}
    auto = compressed["auto"]
    assert auto["coverage"] == coverage and (auto["expected_coverage"] >= coverage or auto["guard"])
    assert "North Sea" in compressed["text"] and compressed["tokens_after"] < compressed["tokens_before"]


def test_python_cli_and_http_default_to_auto_and_take_coverage(tmp_path: Path, live_server: Any) -> None:
    python = RagZip("exit", tokenizer="whitespace").compress(QUESTION, CONTEXTS).to_contract()
    _check_auto(python)
    looser = RagZip("exit", tokenizer="whitespace").compress(QUESTION, CONTEXTS, coverage=0.5).to_contract()
    _check_auto(looser, 0.5)
    assert looser["tokens_after"] <= python["tokens_after"]

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"question": QUESTION, "contexts": CONTEXTS}) + "\n")
    for extra, coverage in (([], 0.95), (["--coverage", "0.5"], 0.5)):
        out = tmp_path / f"out{coverage}.jsonl"
        res = CliRunner().invoke(cli_app, ["compress", str(src), "-o", str(out), "--tokenizer", "whitespace", *extra])
        assert res.exit_code == 0, res.output
        cli = json.loads(out.read_text())["compressed"]
        _check_auto(cli, coverage)
        assert cli["text"] == (python if coverage == 0.95 else looser)["text"]

    server = live_server(create_app(ServerConfig(upstream="http://127.0.0.1:9/v1", tokenizer="whitespace")))
    for ragzip, coverage in (({}, 0.95), ({"coverage": 0.5}, 0.5)):
        resp = httpx.post(f"{server.url}/v1/compress", json={"question": QUESTION, "contexts": CONTEXTS,
                                                             "ragzip": ragzip}, timeout=120)
        assert resp.status_code == 200, resp.text
        _check_auto(resp.json()["compressed"], coverage)
    for bad in ({"coverage": 0}, {"coverage": 1.5}, {"coverage": 0.9, "rate": 0.5}):
        resp = httpx.post(f"{server.url}/v1/compress", json={"question": QUESTION, "contexts": CONTEXTS,
                                                             "ragzip": bad}, timeout=60)
        assert resp.status_code == 400, (bad, resp.text)


def test_the_chat_proxy_reports_the_auto_budget(live_server: Any) -> None:
    seen: list[dict[str, Any]] = []
    upstream = live_server(recording_upstream(seen))
    proxy = live_server(create_app(ServerConfig(upstream=f"{upstream.url}/v1", tokenizer="whitespace")))
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}],
                                           extra_body={"documents": CONTEXTS})
    info = reply.model_extra["ragzip"]  # type: ignore[index]
    assert info["budget"] == DEFAULT and info["auto"]["coverage"] == 0.95
    assert info["tokens_after"] < info["tokens_before"] and "North Sea" in seen[-1]["messages"][-1]["content"]


def test_langchain_llamaindex_and_the_llmlingua_dropin_default_to_auto() -> None:
    lc_docs = [LCDocument(page_content=c["text"], id=c["id"]) for c in CONTEXTS]
    for comp, coverage in ((RagzipCompressor(method="exit", tokenizer="whitespace"), 0.95),
                           (RagzipCompressor(method="exit", tokenizer="whitespace", coverage=0.5), 0.5)):
        docs = list(comp.compress_documents(lc_docs, QUESTION))
        meta = docs[0].metadata["ragzip"]
        assert meta["query_budget"] == {"auto": {"coverage": coverage}} and meta["query_auto"]["coverage"] == coverage
        assert any("North Sea" in d.page_content for d in docs)

    nodes = [NodeWithScore(node=TextNode(text=c["text"], id_=c["id"]), score=1.0) for c in CONTEXTS]
    post = RagzipNodePostprocessor(method="exit", tokenizer="whitespace")
    kept = post.postprocess_nodes(nodes, query_bundle=QueryBundle(QUESTION))
    assert kept[0].node.metadata["ragzip"]["query_budget"] == DEFAULT

    res = PromptCompressor().compress_prompt([c["text"] for c in CONTEXTS], question=QUESTION)
    assert res["ragzip"]["budget"] == DEFAULT and "North Sea" in res["compressed_prompt"]
    assert res["compressed_tokens"] < res["origin_tokens"]
    fixed = PromptCompressor().compress_prompt([c["text"] for c in CONTEXTS], question=QUESTION, rate=0.9)
    assert fixed["ragzip"]["budget"] != DEFAULT  # an explicit rate is still a rate
