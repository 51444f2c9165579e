"""One request through every surface (Python, CLI, /v1/compress, LangChain local and remote): the same answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from langchain_core.documents import Document as LCDocument
from typer.testing import CliRunner

from ragzip import Budget, RagZip
from ragzip.cli import app as cli_app
from ragzip.errors import InputError
from ragzip.langchain import RagzipCompressor
from ragzip.server.app import create_app
from ragzip.server.config import ServerConfig
from ragzip.server.context import parse_block

QUESTION = "Where does the Rhine end?"
CONTEXTS: list[Any] = [
    {"id": "r", "title": "Rhine", "text": "The Rhine rises in the Swiss Alps. It ends in the North Sea. It is long."},
    {"id": "p", "text": "Paris is the capital of France. It has many museums. The Louvre is the largest."},
    "The Alps are a mountain range. Many rivers rise there. The North Sea is cold.",  # a plain-string context
]
RECORD = {"id": "q1", "question": QUESTION, "contexts": CONTEXTS}
KEYS = ("id", "title", "text", "spans", "scores", "tokens_before", "tokens_after")


def _contexts(compressed: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: c.get(k) for k in KEYS} for c in compressed["contexts"]]


def _lc_contexts(docs: list[LCDocument]) -> list[dict[str, Any]]:
    out = []
    for d in docs:
        meta = d.metadata["ragzip"]
        out.append({"id": str(d.id), "title": d.metadata.get("title", ""), "text": d.page_content,
                    "spans": meta["spans"], "scores": meta["scores"], "tokens_before": meta["tokens_before"],
                    "tokens_after": meta["tokens_after"]})
    return out


def _lc_documents() -> list[LCDocument]:
    docs = []
    for i, c in enumerate(CONTEXTS):
        if isinstance(c, str):
            docs.append(LCDocument(page_content=c, id=str(i)))
        else:
            docs.append(LCDocument(page_content=c["text"], id=c["id"], metadata={"title": c.get("title", "")}))
    return docs


def test_every_surface_gives_the_same_text_and_metadata(tmp_path: Path, live_server: Any) -> None:
    python = RagZip("embed-topk", tokenizer="whitespace").compress(QUESTION, CONTEXTS, Budget.ratio(0.5))
    expected = python.to_contract()
    assert expected["tokens_after"] < expected["tokens_before"] and len(expected["contexts"]) >= 2
    assert all(c["scores"] and c["tokens_after"] for c in expected["contexts"])

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps(RECORD) + "\n")
    res = CliRunner().invoke(cli_app, ["compress", str(src), "-o", str(out), "-m", "embed-topk", "--rate", "0.5",
                                       "--tokenizer", "whitespace"])
    assert res.exit_code == 0, res.output
    cli = json.loads(out.read_text())["compressed"]

    server = live_server(create_app(ServerConfig(upstream="http://127.0.0.1:9/v1", tokenizer="whitespace")))
    resp = httpx.post(f"{server.url}/v1/compress", json={**RECORD, "ragzip": {"method": "embed-topk", "rate": 0.5}},
                      timeout=120)
    assert resp.status_code == 200, resp.text
    http = resp.json()["compressed"]

    for other in (cli, http):
        assert _contexts(other) == _contexts(expected)
        assert {k: other[k] for k in ("method", "text", "tokens_before", "tokens_after", "rate")} == {
            k: expected[k] for k in ("method", "text", "tokens_before", "tokens_after", "rate")}

    local = RagzipCompressor(method="embed-topk", rate=0.5, tokenizer="whitespace")
    remote = RagzipCompressor(method="embed-topk", rate=0.5, base_url=server.url)
    for comp in (local, remote):
        docs = list(comp.compress_documents(_lc_documents(), QUESTION))
        assert _lc_contexts(docs) == _contexts(expected)
        assert all(d.metadata["relevance_score"] == max(d.metadata["ragzip"]["scores"]) for d in docs)
        assert docs[0].metadata.get("title") == "Rhine"  # the input's own metadata is kept


def test_every_surface_refuses_the_same_bad_input(tmp_path: Path, live_server: Any) -> None:
    bad = {"question": 5, "contexts": CONTEXTS}
    with pytest.raises(InputError, match="question"):
        RagZip("truncate", tokenizer="whitespace").compress(5, CONTEXTS)  # type: ignore[arg-type]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps(bad) + "\n" + json.dumps({"contexts": [{"id": "a", "text": "x"}, {"id": "a",
                                                                                              "text": "y"}]}) + "\n")
    res = CliRunner().invoke(cli_app, ["compress", str(src), "-o", str(out), "-m", "truncate", "--tokenizer",
                                       "whitespace"])
    assert res.exit_code == 1 and "question" in res.output and "appears twice" in res.output
    server = live_server(create_app(ServerConfig(upstream="http://127.0.0.1:9/v1", tokenizer="whitespace")))
    resp = httpx.post(f"{server.url}/v1/compress", json={"contexts": [{"id": "a", "text": "x"},
                                                                      {"id": "a", "text": "y"}]}, timeout=60)
    assert resp.status_code == 400 and "appears twice" in resp.json()["error"]["message"]
    resp = httpx.post(f"{server.url}/v1/compress", json=bad, timeout=60)
    assert resp.status_code == 400


def recording_upstream(seen: list[dict[str, Any]]) -> FastAPI:
    """An OpenAI-compatible upstream that records each request body and answers "ok"."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> Any:
        seen.append(body)
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model", "m"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}

    return app


def test_the_chat_path_agrees_with_the_other_surfaces_and_takes_plain_strings(live_server: Any) -> None:
    expected = RagZip("embed-topk", tokenizer="whitespace").compress(QUESTION, CONTEXTS, Budget.ratio(0.5))
    seen: list[dict[str, Any]] = []
    upstream = live_server(recording_upstream(seen))
    proxy = live_server(create_app(ServerConfig(upstream=f"{upstream.url}/v1", tokenizer="whitespace")))
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    strings = [c if isinstance(c, str) else c["text"] for c in CONTEXTS]
    for documents, ids in ((CONTEXTS, ["r", "p", "2"]), (strings, ["0", "1", "2"])):  # strings only too
        reply = client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": QUESTION}],
            extra_body={"documents": documents, "ragzip": {"method": "embed-topk", "rate": 0.5}})
        info = reply.parse().model_extra["ragzip"]  # type: ignore[index]
        assert reply.http_response.status_code == 200
        assert (info["tokens_before"], info["tokens_after"]) == (expected.tokens_before, expected.tokens_after)
        sent = seen[-1]["messages"][-1]["content"]
        block = parse_block(sent[sent.index(">") + 1:sent.index("</documents>")])
        assert [d.text for d in block] == [d.text for d in expected.documents]
        positions = [["r", "p", "2"].index(d.id) for d in expected.documents]
        assert [d.id for d in block] == [ids[p] for p in positions]


def test_two_proxies_in_a_chain_compress_once(live_server: Any) -> None:
    seen: list[dict[str, Any]] = []
    upstream = live_server(recording_upstream(seen))
    back = live_server(create_app(ServerConfig(upstream=f"{upstream.url}/v1", tokenizer="whitespace",
                                               method="embed-topk", rate=0.5)))
    front = live_server(create_app(ServerConfig(upstream=f"{back.url}/v1", tokenizer="whitespace",
                                                method="embed-topk", rate=0.5)))
    client = openai.OpenAI(base_url=f"{front.url}/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}],
                                           extra_body={"documents": CONTEXTS})
    told = reply.model_extra["ragzip"]  # type: ignore[index]
    sent = seen[-1]["messages"][-1]["content"]
    got = parse_block(sent[sent.index(">") + 1:sent.index("</documents>")])
    # What the model received is what the client was told: compressed once, at rate 0.5.
    assert sum(len(d.text.split()) for d in got) == told["tokens_after"] <= told["tokens_before"] // 2


def test_a_lone_surrogate_is_a_400_on_every_route(live_server: Any) -> None:
    seen: list[dict[str, Any]] = []
    upstream = live_server(recording_upstream(seen))
    proxy = live_server(create_app(ServerConfig(upstream=f"{upstream.url}/v1", tokenizer="whitespace")))
    bad = '"Paris\\ud800 is in France."'  # valid JSON, not valid Unicode
    bodies = {
        "/v1/compress": f'{{"question": "Where?", "contexts": [{bad}]}}',
        "/v1/chat/completions": f'{{"model": "m", "messages": [{{"role": "user", "content": "Where?"}}], '
                                f'"documents": [{{"text": {bad}}}]}}',
        "/v1/documents": f'{{"documents": [{bad}]}}',
    }
    bodies["chat in a message"] = bodies["/v1/chat/completions"].replace('"Where?"', bad)
    for route, body in bodies.items():
        path = route if route.startswith("/") else "/v1/chat/completions"
        resp = httpx.post(f"{proxy.url}{path}", content=body, headers={"content-type": "application/json"},
                          timeout=60)
        assert resp.status_code == 400, (route, resp.status_code, resp.text)
        assert "surrogate" in resp.json()["error"]["message"]
    assert not seen  # nothing was forwarded


def test_chat_falls_back_when_the_servers_compressor_cannot_load(live_server: Any) -> None:
    seen: list[dict[str, Any]] = []
    upstream = live_server(recording_upstream(seen))
    proxy = live_server(create_app(ServerConfig(upstream=f"{upstream.url}/v1", tokenizer="whitespace",
                                                method="exit", options={"weights": "/nonexistent/exit-weights"},
                                                warm_compressor=False)))
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": QUESTION}], extra_body={"documents": CONTEXTS})
    assert reply.http_response.status_code == 200 and reply.headers["x-ragzip-fallback"] == "uncompressed"
    info = reply.parse().model_extra["ragzip"]  # type: ignore[index]
    assert info["method"] == "none" and "unavailable" in info["fallback"] and "/nonexistent" not in info["fallback"]
    assert seen and "North Sea" in seen[-1]["messages"][-1]["content"]  # the model got the whole context
