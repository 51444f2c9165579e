"""The proxy's KV-reuse backend on the real embedded model: warm with `ragzip kv warm`, then every chunk hits,
the response says what was reused, and the client's system prompt and earlier turns reach the prompt."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from ragzip.engine import LocalEngine
from ragzip.kvstore.cli import app as kv_app
from ragzip.server.app import create_app
from ragzip.server.config import ServerConfig
from ragzip.types import Document

DOCS = [{"id": "t", "title": "Tower", "text": "The Eiffel Tower is in Paris, France. It was built in 1889."},
        {"id": "o", "text": "Oxygen has atomic number 8. It is a gas at room temperature."}]
QUESTION = "In which city is the Eiffel Tower?"


def test_warm_then_the_kv_proxy_hits_every_document_and_keeps_the_conversation(engine: LocalEngine,
                                                                               tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    store = f"disk:{tmp_path / 'kv'}"
    res = CliRunner().invoke(kv_app, ["warm", str(src), "--store", store, "--codec", "int8"])
    assert res.exit_code == 0, res.output
    cfg = ServerConfig(method="none", tokenizer="whitespace", kv_store=store, kv_mode="blend")
    with TestClient(create_app(cfg, engine=engine)) as client:
        kv_engine = client.app.state.ragzip.backend.kv_engine  # type: ignore[attr-defined]
        plain = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": QUESTION}], "documents": DOCS, "max_tokens": 8})
        assert plain.status_code == 200, plain.text
        body = plain.json()
        kv = body["ragzip"]["kv"]
        assert (kv["hits"], kv["misses"]) == (2, 0) and kv["reused_tokens"] > 0 and kv["load_s"] >= 0
        assert "Paris" in body["choices"][0]["message"]["content"]

        system = "You are a terse assistant. Answer with one word."
        history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "system", "content": system}, *history, {"role": "user", "content": QUESTION}],
            "documents": DOCS, "max_tokens": 8, "stream": True})
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        kv = next(e["ragzip"]["kv"] for e in events if "kv" in e.get("ragzip", {}))
        assert (kv["hits"], kv["misses"]) == (2, 0)  # document caches do not depend on the system prompt
        docs = [Document(d["id"], d["text"], d.get("title", "")) for d in DOCS]
        expected = kv_engine.pieces(QUESTION, docs, system=system, history=history)
        assert kv_engine.stats.prompt_tokens == len(expected.token_ids)
        header = engine.tokenizer.decode(expected.header)
        assert system in header and "Hello" in header and "Hi." in header


def test_the_kv_proxy_defaults_to_auto_and_says_which_path_ran_and_why(engine: LocalEngine, tmp_path: Path) -> None:
    cfg = ServerConfig(method="none", tokenizer="whitespace", kv_store=f"disk:{tmp_path / 'kv'}")
    with TestClient(create_app(cfg, engine=engine)) as client:
        kv_engine = client.app.state.ragzip.backend.kv_engine  # type: ignore[attr-defined]
        verdict = kv_engine.qualification  # calibrated at startup (or read from the cache dir)
        body = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": QUESTION}], "documents": DOCS, "max_tokens": 8}).json()
        kv = body["ragzip"]["kv"]
        assert kv["requested"] == "auto" and kv["reason"].startswith(verdict.reason)
        if verdict.qualified:
            assert kv["mode"] == "blend" and kv["ratio"] == verdict.ratio
        else:  # never a blend the gate has not shown to keep answers: the answer is full prefill's
            assert kv["mode"] in ("prefix", "full") and "ratio" not in kv
            docs = [Document(d["id"], d["text"], d.get("title", "")) for d in DOCS]
            full = kv_engine.answer(QUESTION, docs, max_new_tokens=8, mode="full")
            assert body["choices"][0]["message"]["content"] == full
