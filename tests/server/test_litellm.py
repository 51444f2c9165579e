"""The `ragzip.litellm` guardrail inside LiteLLM's real proxy (from .venv-litellm, built by scripts/litellm_env.sh,
which `make test` runs), started on loopback in front of an upstream that echoes what it was sent, so each test
reads the prompt the LLM got: compressed in-process, compressed by a ragzip server, and forwarded uncompressed
(fail-open) when that server is down, or refused when fail_open is off."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ragzip.eval.harness import LITELLM_VENV, LiteLLMProxy, free_port
from ragzip.server.app import create_app
from ragzip.server.config import ServerConfig

from .conftest import LiveServer, ServerFactory, echo_upstream

LITELLM = LITELLM_VENV / "bin" / "litellm"
# CI builds .venv-litellm (`make test`): there a missing venv fails the tests instead of skipping them.
pytestmark = pytest.mark.skipif(not LITELLM.exists() and not os.environ.get("CI"),
                                reason="no .venv-litellm (run scripts/litellm_env.sh)")

FILLER = " ".join(f"Filler sentence number {i} talks about bread and rivers." for i in range(40))
DOCS = [{"id": "tower", "title": "Tower", "text": "The Eiffel Tower is in Paris. It was built in 1889. " + FILLER},
        {"id": "bread", "title": "Bread", "text": "Bread is baked from dough. " + FILLER}]


@pytest.fixture(scope="module")
def upstream(live_server: ServerFactory) -> tuple[LiveServer, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    return live_server(echo_upstream(seen)), seen


@pytest.fixture(scope="module")
def ragzip_server(live_server: ServerFactory, upstream: tuple[LiveServer, list[dict[str, Any]]]) -> LiveServer:
    """A ragzip server whose /v1/compress the remote guardrail calls (truncate: no model to load)."""
    return live_server(create_app(ServerConfig(upstream=f"{upstream[0].url}/v1", method="truncate",
                                               api_keys=["sk-ragzip"], warm_compressor=False)))


def _guardrail(name: str, **params: Any) -> dict[str, Any]:
    return {"guardrail_name": name, "litellm_params": {"guardrail": "ragzip.litellm.RagzipGuardrail",
                                                       "mode": "pre_call", "default_on": False, **params}}


@pytest.fixture(scope="module")
def litellm_proxy(upstream: tuple[LiveServer, list[dict[str, Any]]],
                  ragzip_server: LiveServer) -> Iterator[tuple[str, str]]:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    guardrails = [
        _guardrail("ragzip-local", method="exit", rate=0.3),
        _guardrail("ragzip-remote", api_base=ragzip_server.url, api_key="sk-ragzip", method="truncate",
                   target_tokens=40),
        _guardrail("ragzip-down", api_base=dead, method="truncate", target_tokens=40, timeout_s=2),
        _guardrail("ragzip-strict", api_base=dead, method="truncate", target_tokens=40, fail_open=False),
    ]
    proxy = LiteLLMProxy(f"{upstream[0].url}/v1", model_name="echo", guardrails=guardrails)
    try:
        yield proxy.url, proxy.master_key
    finally:
        proxy.stop()


def _ask(proxy: tuple[str, str], guardrail: str, **extra: Any) -> httpx.Response:
    url, master = proxy
    body = {"model": "echo", "messages": [{"role": "user", "content": "Where is the Eiffel Tower?"}],
            "documents": DOCS, "guardrails": [guardrail], **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {master}"},
                      timeout=120)


def _prompt(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    messages = json.loads(r.json()["choices"][0]["message"]["content"])
    return "\n".join(m["content"] for m in messages if isinstance(m.get("content"), str))


def _full_chars() -> int:
    return sum(len(d["text"]) for d in DOCS)


def test_in_process_guardrail_compresses_the_documents(litellm_proxy: tuple[str, str],
                                                       upstream: tuple[LiveServer, list[dict[str, Any]]]) -> None:
    r = _ask(litellm_proxy, "ragzip-local")
    prompt = _prompt(r)
    assert '<documents compressed-by="ragzip">' in prompt and "Where is the Eiffel Tower?" in prompt
    assert "Eiffel Tower is in Paris" in prompt  # the answer survives ...
    assert len(prompt) < 0.6 * _full_chars()  # ... and most of the filler does not
    assert "documents" not in upstream[1][-1]  # the extra key is not forwarded to the LLM
    before, after = int(r.headers["x-ragzip-tokens-before"]), int(r.headers["x-ragzip-tokens-after"])
    assert r.headers["x-ragzip-method"] == "exit" and 0 < after < 0.6 * before
    assert "x-ragzip-fallback" not in r.headers


def test_remote_guardrail_calls_the_ragzip_server(litellm_proxy: tuple[str, str]) -> None:
    r = _ask(litellm_proxy, "ragzip-remote")
    prompt = _prompt(r)
    assert r.headers["x-ragzip-method"] == "truncate" and int(r.headers["x-ragzip-tokens-after"]) <= 40
    assert '<documents compressed-by="ragzip">' in prompt and len(prompt) < 0.3 * _full_chars()
    # the request's own ragzip object sets its budget
    r = _ask(litellm_proxy, "ragzip-remote", ragzip={"target_tokens": 80})
    assert 40 < int(r.headers["x-ragzip-tokens-after"]) <= 80


def test_guardrail_fails_open_when_the_ragzip_server_is_down(litellm_proxy: tuple[str, str]) -> None:
    r = _ask(litellm_proxy, "ragzip-down")
    prompt = _prompt(r)
    assert r.headers["x-ragzip-fallback"] == "uncompressed" and r.headers["x-ragzip-method"] == "none"
    for doc in DOCS:  # every document reaches the LLM whole
        assert doc["text"] in prompt


def test_guardrail_without_fail_open_refuses(litellm_proxy: tuple[str, str]) -> None:
    r = _ask(litellm_proxy, "ragzip-strict")
    assert r.status_code >= 400


def test_requests_without_the_guardrail_pass_through(litellm_proxy: tuple[str, str],
                                                     upstream: tuple[LiveServer, list[dict[str, Any]]]) -> None:
    url, master = litellm_proxy
    block = "<documents>\n" + "\n\n".join(d["text"] for d in DOCS) + "\n</documents>\nWhere is the Eiffel Tower?"
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "echo", "messages": [{"role": "user",
                   "content": block}]}, headers={"authorization": f"Bearer {master}"}, timeout=60)
    assert _prompt(r) == block and "x-ragzip-method" not in r.headers
    r = _ask(litellm_proxy, "ragzip-remote", messages=[{"role": "user", "content": block}], documents=None)
    prompt = _prompt(r)  # the guardrail compresses a <documents> block in the messages, in place
    assert prompt.startswith('<documents compressed-by="ragzip">') and prompt.endswith("Where is the Eiffel Tower?")
    assert len(prompt) < 0.5 * len(block)


def test_malformed_documents_fail_open(litellm_proxy: tuple[str, str]) -> None:
    r = _ask(litellm_proxy, "ragzip-remote", documents=[{"text": 5}])
    assert _prompt(r) == "Where is the Eiffel Tower?"  # forwarded as it was, without the documents key
