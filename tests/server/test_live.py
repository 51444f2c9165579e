"""Real clients against real servers: the official `openai` client talks to a ragzip proxy over loopback, whose
upstream is a second ragzip server running the local engine (SmolLM2-135M)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from ragzip.engine import LocalEngine
from ragzip.server.app import create_app
from ragzip.server.config import ServerConfig

if TYPE_CHECKING:
    from .conftest import LiveServer, ServerFactory  # type: ignore[import-not-found]

DOCS = [
    {"id": "eiffel", "title": "Eiffel Tower",
     "text": "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was completed in 1889. "
             "Gustave Eiffel's company designed and built the tower. It is 330 metres tall."},
    {"id": "bread", "title": "Bread",
     "text": "Bread is a staple food prepared from a dough of flour and water. It is usually baked. "
             "Throughout recorded history bread has been popular around the world."},
    {"id": "oxygen", "title": "Oxygen",
     "text": "Oxygen is a chemical element with the symbol O and atomic number 8. It is a highly reactive "
             "nonmetal. Oxygen is the third-most abundant element in the universe by mass."},
]
QUESTION = "In which city is the Eiffel Tower?"
HOLD = threading.Event()


@pytest.fixture(scope="module")
def engine_server(live_server: ServerFactory, engine: LocalEngine) -> LiveServer:
    cfg = ServerConfig(method="none", tokenizer="whitespace", max_new_tokens=16, default_max_new_tokens=8)
    return live_server(create_app(cfg, engine=engine))


@pytest.fixture(scope="module")
def proxy(live_server: ServerFactory, engine_server: LiveServer) -> LiveServer:
    cfg = ServerConfig(upstream=f"{engine_server.url}/v1", method="embed-topk", target_tokens=30,
                       tokenizer="whitespace", api_keys=["sk-test"])
    return live_server(create_app(cfg))


def stub_upstream() -> FastAPI:
    """A deliberately misbehaving OpenAI-compatible server: slow, failing, or holding until released."""
    app = FastAPI()

    @app.get("/models/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model", "created": 1, "owned_by": "x"},
                                           {"id": "llama-3-8b", "object": "model", "created": 2, "owned_by": "y"}]}

    @app.get("/fail/v1/models")
    async def models_down() -> Any:
        return JSONResponse({"error": {"message": "models offline", "type": "server_error"}}, status_code=503)

    @app.post("/slow/v1/chat/completions")
    async def slow() -> Any:
        await asyncio.sleep(5)
        return {"choices": []}

    @app.post("/long/v1/chat/completions")
    async def too_long() -> Any:
        return JSONResponse({"error": {"message": "This model's maximum context length is 8 tokens",
                                       "type": "invalid_request_error", "param": "messages",
                                       "code": "context_length_exceeded"}}, status_code=400)

    @app.post("/limited/v1/chat/completions")
    async def limited() -> Any:
        return JSONResponse({"error": {"message": "Rate limit reached", "type": "tokens", "param": None,
                                       "code": "rate_limit_exceeded"}}, status_code=429,
                            headers={"retry-after": "7", "x-ratelimit-remaining-tokens": "0"})

    @app.post("/fail/v1/chat/completions")
    async def fail() -> Any:
        return JSONResponse({"error": {"message": "model crashed", "type": "server_error"}}, status_code=500)

    @app.post("/hold/v1/chat/completions")
    async def hold() -> Any:
        while not HOLD.is_set():
            await asyncio.sleep(0.02)
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "stub",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}

    return app


@pytest.fixture(scope="module")
def stub(live_server: ServerFactory) -> LiveServer:
    return live_server(stub_upstream())


def test_openai_client_through_proxy_to_engine_server(proxy: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-test", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="ragzip-local", messages=[{"role": "user", "content": QUESTION}], max_tokens=8,
        extra_body={"documents": DOCS, "ragzip": {"method": "embed-topk", "target_tokens": 25}})
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.model == "ragzip-local"  # the engine server's answer came back through the proxy
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 8
    info = completion.model_extra["ragzip"]
    assert info["method"] == "embed-topk" and info["source"] == "documents" and info["fallback"] is None
    total = sum(len(d["text"].split()) for d in DOCS)
    assert info["tokens_before"] == total and 0 < info["tokens_after"] <= 25
    assert raw.headers["x-ragzip-tokens-after"] == str(info["tokens_after"])
    assert raw.headers["x-ragzip-method"] == "embed-topk"


def test_openai_client_streams_through_proxy(proxy: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-test", max_retries=0)
    stream = client.chat.completions.create(
        model="ragzip-local", stream=True, max_tokens=6, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": f"<documents>\n{DOCS[2]['text']}\n\n{DOCS[1]['text']}\n</documents>\n"
                                              "What is the atomic number of oxygen?"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    first = chunks[0].model_extra["ragzip"]
    assert first["source"] == "messages" and first["num_documents"] == 2
    assert first["tokens_after"] < first["tokens_before"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_engine_server_directly_and_auth_on_proxy(engine_server: LiveServer, proxy: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{engine_server.url}/v1", api_key="unused", max_retries=0)
    for model in ("ragzip-local", "smollm2-135m-instruct"):  # the served name and the engine's model
        completion = client.chat.completions.create(model=model, max_tokens=4,
                                                    messages=[{"role": "user", "content": "Hi"}])
        assert completion.choices[0].finish_reason in ("stop", "length")
        assert completion.model_extra["ragzip"]["source"] == "none"
    bad = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}])
    assert exc.value.code == "invalid_api_key"


def test_the_local_engine_refuses_what_it_would_ignore(engine_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{engine_server.url}/v1", api_key="unused", max_retries=0)
    hi = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=hi)
    assert missing.value.code == "model_not_found" and "ragzip-local" in missing.value.message
    with pytest.raises(openai.BadRequestError) as several:
        client.chat.completions.create(model="ragzip-local", n=2, messages=hi)
    assert several.value.code == "unsupported_parameter" and several.value.param == "n"
    assert client.chat.completions.create(model="ragzip-local", n=1, max_tokens=2, messages=hi).choices


def test_upstream_error_details_pass_through(live_server: ServerFactory, stub: LiveServer) -> None:
    for path, error, status in (("/long/v1", openai.BadRequestError, 400), ("/limited/v1", openai.RateLimitError, 429)):
        server = live_server(create_app(ServerConfig(upstream=f"{stub.url}{path}", method="none",
                                                     tokenizer="whitespace")))
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
        for stream in (False, True):
            with pytest.raises(error) as exc:
                client.chat.completions.create(model="x", stream=stream, messages=[{"role": "user", "content": "Hi"}])
            assert exc.value.status_code == status
            body = exc.value.body
            assert isinstance(body, dict)
            if status == 400:
                assert (exc.value.code, exc.value.param) == ("context_length_exceeded", "messages")
                assert body["ragzip_code"] == "upstream_rejected" and "maximum context" in exc.value.message
            else:
                assert exc.value.code == "rate_limit_exceeded" and body["ragzip_code"] == "upstream_rate_limited"
                assert exc.value.response.headers["retry-after"] == "7"
                assert exc.value.response.headers["x-ratelimit-remaining-tokens"] == "0"


def test_upstream_timeout_is_504_and_failure_502(live_server: ServerFactory, stub: LiveServer) -> None:
    slow = live_server(create_app(ServerConfig(upstream=f"{stub.url}/slow/v1", upstream_timeout_s=0.5,
                                               method="none", tokenizer="whitespace")))
    client = openai.OpenAI(base_url=f"{slow.url}/v1", api_key="k", max_retries=0)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}])
    assert exc.value.status_code == 504 and exc.value.code == "upstream_timeout"
    assert time.monotonic() - started < 4
    failing = live_server(create_app(ServerConfig(upstream=f"{stub.url}/fail/v1", method="none",
                                                  tokenizer="whitespace")))
    client = openai.OpenAI(base_url=f"{failing.url}/v1", api_key="k", max_retries=0)
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model="x", stream=stream, messages=[{"role": "user", "content": "Hi"}])
        assert exc.value.status_code == 502 and "model crashed" in exc.value.message


def test_full_server_answers_429(live_server: ServerFactory, stub: LiveServer) -> None:
    HOLD.clear()
    server = live_server(create_app(ServerConfig(upstream=f"{stub.url}/hold/v1", max_concurrency=1, queue_depth=0,
                                                 method="none", tokenizer="whitespace")))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "one"}])))
    first.start()
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/healthz").json()["in_flight"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "two"}])
    assert exc.value.code == "server_busy" and exc.value.response.headers["retry-after"] == "1"
    HOLD.set()
    first.join(timeout=10)
    assert results and results[0].choices[0].message.content == "ok"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'ragzip_rejected_total{reason="busy"} 1.0' in metrics


def test_langchain_compressor_uses_the_server_asynchronously(proxy: LiveServer) -> None:
    from langchain_core.documents import Document

    from ragzip.langchain import RagzipCompressor

    comp = RagzipCompressor(base_url=proxy.url, api_key="sk-test", method="truncate", target_tokens=5)
    docs = [Document(page_content=d["text"], metadata={"title": d["title"]}, id=d["id"]) for d in DOCS]
    out = asyncio.run(comp.acompress_documents(docs, QUESTION))
    assert [d.page_content for d in out] == ["The Eiffel Tower is a"]
    assert out[0].id == "eiffel" and out[0].metadata["title"] == "Eiffel Tower"
    assert out[0].metadata["ragzip"]["spans"][0] == [0, 3] and out[0].metadata["ragzip"]["method"] == "truncate"
    assert [d.page_content for d in comp.compress_documents(docs, QUESTION)] == ["The Eiffel Tower is a"]


def test_models_are_the_upstreams_own_list(live_server: ServerFactory, stub: LiveServer,
                                           engine_server: LiveServer) -> None:
    proxy = live_server(create_app(ServerConfig(upstream=f"{stub.url}/models/v1", method="none",
                                                tokenizer="whitespace", api_keys=["sk-test"])))
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-test", max_retries=0)
    assert [m.id for m in client.models.list()] == ["gpt-4o-mini", "llama-3-8b"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="wrong", max_retries=0).models.list()
    down = live_server(create_app(ServerConfig(upstream=f"{stub.url}/fail/v1", method="none",
                                               tokenizer="whitespace")))
    with pytest.raises(openai.APIStatusError) as exc:
        openai.OpenAI(base_url=f"{down.url}/v1", api_key="k", max_retries=0).models.list()
    assert exc.value.status_code == 502 and "models offline" in exc.value.message
    local = openai.OpenAI(base_url=f"{engine_server.url}/v1", api_key="k", max_retries=0)
    assert [m.id for m in local.models.list()] == ["ragzip-local"]
