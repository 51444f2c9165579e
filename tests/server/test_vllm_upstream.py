"""`upstream_kind: "vllm"`: the proxy sends the answer prompt as token ids, documents in a canonical order, with
their spans for the KV connector, and answers in the chat shape (streamed or not).

The upstream is a stand-in for vLLM's `/v1/completions` that records the body and answers with the prompt's length
(the real vLLM runs in `make vllm-e2e`).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from pydantic import ValidationError

from ragzip.prompt import PromptBuilder
from ragzip.registry import load_tokenizer
from ragzip.server.app import create_app
from ragzip.server.config import ServerConfig
from ragzip.types import Document
from ragzip.vllm.layout import lay_out

from .conftest import LiveServer, ServerFactory

DOCS = [{"id": "a", "title": "France", "text": "Paris is the capital of France."},
        {"id": "b", "text": "The Nile flows north into the Mediterranean Sea."},
        {"id": "c", "text": "Mount Kilimanjaro is the highest mountain in Africa."}]
QUESTION = "What is the capital of France?"
TOKENIZER = "smollm2-135m-instruct"


def fake_vllm(seen: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        seen.append(body)
        text = f"{len(body['prompt'])} tokens"
        if body.get("stream"):
            def events() -> Any:
                for part in (text[:3], text[3:]):
                    yield "data: " + json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1,
                                                 "model": body["model"], "choices": [
                                                     {"index": 0, "text": part, "finish_reason": None}]}) + "\n\n"
                yield "data: " + json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1,
                                             "model": body["model"], "choices": [
                                                 {"index": 0, "text": "", "finish_reason": "length"}]}) + "\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 2,
                          "total_tokens": len(body["prompt"]) + 2},
                "kv_transfer_params": {"ragzip": {"loaded_tokens": 128}}}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        seen.append(body)
        return {"id": "chat-1", "object": "chat.completion", "created": 1, "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "plain chat"},
                             "finish_reason": "stop"}]}

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": "m"}]}

    return app


@pytest.fixture(scope="module")
def upstream(live_server: ServerFactory) -> tuple[LiveServer, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    return live_server(fake_vllm(seen)), seen


@pytest.fixture(scope="module")
def client(upstream: tuple[LiveServer, list[dict[str, Any]]]) -> Any:
    cfg = ServerConfig(upstream=f"{upstream[0].url}/v1", upstream_kind="vllm", upstream_tokenizer=TOKENIZER,
                       keys={"sk-raw": {"compress": False}}, warm_compressor=False, method="truncate")
    with TestClient(create_app(cfg)) as c:
        yield c


def ask(client: TestClient, documents: list[dict[str, Any]], **extra: Any) -> Any:
    body = {"model": "m", "messages": [{"role": "user", "content": QUESTION}], "documents": documents,
            "max_tokens": 7, "temperature": 0, **extra}
    return client.post("/v1/chat/completions", json=body, headers={"authorization": "Bearer sk-raw"})


def test_the_prompt_goes_as_token_ids_in_canonical_order_with_spans(client, upstream) -> None:
    seen = upstream[1]
    seen.clear()
    r1 = ask(client, DOCS)
    r2 = ask(client, [DOCS[2], DOCS[0], DOCS[1]])
    assert r1.status_code == 200 and r2.status_code == 200, r1.text
    first, second = seen
    assert first["prompt"] == second["prompt"]  # the same set in another order: one prompt
    builder = PromptBuilder(load_tokenizer(TOKENIZER))
    expected = lay_out(builder, QUESTION, [Document(d["id"], d["text"], d.get("title", "")) for d in DOCS])
    assert first["prompt"] == expected.token_ids
    assert first["kv_transfer_params"] == {"ragzip": {"spans": expected.spans}}
    assert first["max_tokens"] == 7 and first["temperature"] == 0 and first["stream"] is False
    body = r1.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": f"{len(expected.token_ids)} tokens"}
    assert body["ragzip"]["vllm"]["kv"] == {"ragzip": {"loaded_tokens": 128}}
    assert body["ragzip"]["vllm"]["documents"] == 3


def test_a_streamed_answer_comes_back_as_chat_chunks(client, upstream) -> None:
    r = ask(client, DOCS, stream=True)
    assert r.status_code == 200
    chunks = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:") and "[DONE]" not in line]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and "vllm" in chunks[0]["ragzip"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == f"{len(upstream[1][-1]['prompt'])} tokens"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert r.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("extra", [{"tools": [{"type": "function", "function": {"name": "f"}}]},
                                   {"response_format": {"type": "json_object"}},
                                   {"chat_template_kwargs": {"enable_thinking": True}}])
def test_fields_the_prompt_form_cannot_honour_are_refused_not_dropped(client, extra) -> None:
    r = ask(client, DOCS, **extra)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
    assert r.json()["error"]["param"] == next(iter(extra))


def test_sampling_extras_pass_and_an_unset_limit_is_not_vllms_16(client, upstream) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": QUESTION}], "documents": DOCS,
            "min_tokens": 2, "stop_token_ids": [7], "user": "u1"}
    r = client.post("/v1/chat/completions", json=body, headers={"authorization": "Bearer sk-raw"})
    assert r.status_code == 200, r.text
    sent = upstream[1][-1]
    assert sent["min_tokens"] == 2 and sent["stop_token_ids"] == [7] and "user" not in sent
    assert "max_tokens" in sent and sent["max_tokens"] is None  # vLLM: until the model stops


def test_a_chat_without_documents_goes_to_chat_completions(client, upstream) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "ragzip": {"retrieve": False}}
    r = client.post("/v1/chat/completions", json=body, headers={"authorization": "Bearer sk-raw"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "plain chat"
    assert "messages" in upstream[1][-1]


def test_the_vllm_kind_needs_an_upstream_and_its_tokenizer() -> None:
    with pytest.raises(ValidationError, match="upstream_tokenizer"):
        ServerConfig(upstream="http://127.0.0.1:1/v1", upstream_kind="vllm")
    with pytest.raises(ValidationError, match="upstream_kind"):
        ServerConfig(upstream="http://127.0.0.1:1/v1", upstream_kind="sglang")
