"""One request through every surface (Python, CLI, /v1/compress, LangChain local and remote): the same answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_core.documents import Document as LCDocument
from typer.testing import CliRunner

from ragzip import Budget, RagZip
from ragzip.cli import app as cli_app
from ragzip.errors import InputError
from ragzip.langchain import RagzipCompressor
from ragzip.server.app import create_app
from ragzip.server.config import ServerConfig

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
