"""In-process tests of the app (TestClient): the /v1/compress contract, validation, limits, auth, fallback, index."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from ragzip.batch import compress_record
from ragzip.budget import Budget
from ragzip.engine import LocalEngine
from ragzip.errors import ConfigError
from ragzip.pipeline import build_compressor
from ragzip.server.app import create_app
from ragzip.server.config import ServerConfig, load_config
from ragzip.tokens import get_token_counter

RECORD = {"id": "q1", "question": "Where is the tower?", "extra": [1, 2],
          "contexts": [{"id": "a", "title": "Tower", "text": "The tower is in Paris. It is tall. It is iron."},
                       {"text": "Bread is baked from dough. It is eaten everywhere."}]}


def make_client(**cfg: object) -> TestClient:
    base: dict[str, object] = {"upstream": "http://127.0.0.1:9/v1", "method": "truncate", "tokenizer": "whitespace"}
    return TestClient(create_app(ServerConfig(**{**base, **cfg})))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with make_client(api_keys=["sk-1"], max_body_bytes=4096, max_documents=3) as c:
        c.headers["authorization"] = "Bearer sk-1"
        yield c


def test_compress_is_the_cli_contract(client: TestClient) -> None:
    r = client.post("/v1/compress", json={**RECORD, "ragzip": {"method": "truncate", "rate": 0.5}})
    assert r.status_code == 200
    body = r.json()
    expected = compress_record(build_compressor("truncate", counter=get_token_counter("whitespace")), RECORD,
                               Budget.ratio(0.5))
    for key in ("method", "contexts", "text", "tokens_before", "tokens_after", "rate"):
        assert body["compressed"][key] == expected["compressed"][key]
    assert body["extra"] == [1, 2] and body["id"] == "q1" and "ragzip" not in body
    assert body["compressed"]["tokens_after"] <= body["compressed"]["tokens_before"] // 2


@pytest.mark.parametrize(("payload", "code"), [
    ({"question": "q"}, "invalid_request"),
    ({"contexts": [{"text": 3}]}, "invalid_request"),
    ({"contexts": [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}]}, "InputError"),
    ({"contexts": [{"text": "a"}] * 4}, "too_many_documents"),
    ({"contexts": [], "ragzip": {"rate": 2}}, "invalid_request"),
    ({"contexts": [], "ragzip": {"rate": 0.5, "target_tokens": 3}}, "invalid_request"),
    ({"contexts": [], "ragzip": {"method": "exit+/etc/passwd"}}, "invalid_method"),
    ({"contexts": [], "ragzip": {"method": "truncate", "options": {"x": 1}}}, "options_not_allowed"),
    ({"contexts": [], "ragzip": {"bogus": 1}}, "invalid_request"),
])
def test_bad_requests_are_400_with_openai_errors(client: TestClient, payload: dict[str, object], code: str) -> None:
    r = client.post("/v1/compress", json=payload)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error" and err["message"]


def test_auth_size_limits_and_open_routes(client: TestClient) -> None:
    assert client.post("/v1/compress", json=RECORD, headers={"authorization": "Bearer nope"}).status_code == 401
    headers = {"authorization": "", "x-api-key": "sk-1"}
    assert client.post("/v1/compress", json=RECORD, headers=headers).status_code == 200
    with make_client(api_keys=["sk-1"]) as anonymous:
        assert anonymous.get("/healthz").json()["status"] == "ok"
        assert anonymous.get("/metrics").status_code == 200
        r = anonymous.post("/v1/compress", json=RECORD)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    big = {**RECORD, "contexts": [{"text": "word " * 2000}]}
    r = client.post("/v1/compress", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no content-length: the limit applies while the body streams in
        yield b'{"contexts": [{"text": "'
        for _ in range(100):
            yield b"x" * 100
        yield b'"}]}'

    r = client.post("/v1/compress", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.get("/nowhere").json()["error"]["code"] == "not_found"


def test_upstream_down_is_502_and_metrics_count_it(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                  "documents": [{"text": "a b c"}]})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"
    metrics = client.get("/metrics").text
    assert 'ragzip_upstream_errors_total{code="upstream_unreachable"}' in metrics
    assert 'ragzip_requests_total{endpoint="/v1/chat/completions",status="502"}' in metrics
    assert "ragzip_tokens_saved_total" in metrics


def test_config_file_errors(tmp_path: object) -> None:
    with pytest.raises(ConfigError, match="max_concurrency"):
        load_config(None, max_concurrency=0)
    with pytest.raises(ConfigError, match="unknown"):
        load_config(None, unknown=1)
    assert load_config(None, upstream="http://x/v1").upstream == "http://x/v1"


@pytest.fixture(scope="module")
def local(engine: LocalEngine) -> Iterator[TestClient]:
    cfg = ServerConfig(method="embed-topk", tokenizer="whitespace", allow_request_options=True, top_k=2)
    with TestClient(create_app(cfg, engine=engine)) as c:
        yield c


def test_compressor_failure_falls_back_to_full_context(engine: LocalEngine, local: TestClient) -> None:
    docs = [{"id": "a", "text": "The tower is in Paris. It is tall."}, {"id": "b", "text": "Bread is baked."}]
    cfg = ServerConfig(method="embed-topk", tokenizer="whitespace", options={"embedder": "/nonexistent/embedder"})
    with TestClient(create_app(cfg, engine=engine)) as broken:
        r = broken.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Where is the tower?"}], "max_tokens": 1, "documents": docs,
            "ragzip": {"rate": 0.3}})
        assert r.status_code == 200, r.text
        info = r.json()["ragzip"]
        assert info["fallback"] and "ModelNotFoundError" in info["fallback"] and info["method"] == "none"
        assert info["tokens_after"] == info["tokens_before"] == 11
        assert r.headers["x-ragzip-fallback"] == "uncompressed"
        assert 'ragzip_compression_fallbacks_total{method="embed-topk"} 1.0' in broken.get("/metrics").text
    for options in ({"embedder": "/nonexistent/embedder"}, {"device": "cuda"}, {"exit": {"weights": "/etc"}}):
        r = local.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "documents": docs,
            "ragzip": {"method": "embed-topk", "options": options}})
        assert r.status_code == 400 and r.json()["error"]["code"] == "options_not_allowed", r.text
    r = local.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "documents": docs,
        "ragzip": {"method": "embed-topk", "options": {"min_keep": "many"}}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "ConfigError"


def test_index_feeds_requests_without_documents(local: TestClient) -> None:
    docs = [{"id": "paris", "text": "The Eiffel Tower stands in Paris."},
            {"id": "bread", "text": "Bread is made of flour and water."},
            {"id": "oxygen", "text": "Oxygen has atomic number 8."}]
    r = local.post("/v1/documents", json={"documents": docs})
    assert r.status_code == 200 and r.json()["total_chunks"] == 3 and r.json()["ids"] == ["paris", "bread", "oxygen"]
    got = local.get("/v1/documents/paris").json()
    assert got == {"id": "paris", "title": "", "chunks": [{"id": "paris#0", "text": docs[0]["text"], "start": 0,
                                                          "end": len(docs[0]["text"])}]}
    r = local.post("/v1/documents", json={"documents": [{"text": "An untitled note."}]})
    assert local.get(f"/v1/documents/{r.json()['ids'][0]}").json()["chunks"][0]["text"] == "An untitled note."
    missing = local.get("/v1/documents/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "document_not_found"
    assert local.post("/v1/documents", json={"documents": docs[:1]}).status_code == 400  # the id is taken
    question = [{"role": "user", "content": "Where is the Eiffel Tower?"}]
    r = local.post("/v1/chat/completions", json={"messages": question,
                                                 "max_tokens": 1, "ragzip": {"rate": 0.5}})
    info = r.json()["ragzip"]
    assert info["source"] == "index" and info["num_documents"] == 2 and info["method"] == "embed-topk"
    r = local.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                                                 "ragzip": {"retrieve": False}})
    assert r.json()["ragzip"]["source"] == "none" and r.json()["usage"]["completion_tokens"] <= 1
