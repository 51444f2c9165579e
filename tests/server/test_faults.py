"""The proxy under faults, on real loopback servers: a burst waits in the bounded queue, per-key rate limits, a client
that leaves cancels the upstream call or the local generation within a second, the upstream dies and comes back,
Redis dies and comes back under the KV path, the disk store fills up, oversized documents, readiness vs liveness,
start-time refusals, SIGTERM drains, and the logs hold no document text or keys."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from ragzip.cli import app as cli_app
from ragzip.engine import LocalEngine
from ragzip.eval.harness import free_port
from ragzip.server.app import create_app
from ragzip.server.config import ServerConfig

from .conftest import LiveServer, wait_for

if TYPE_CHECKING:
    from .conftest import ServerFactory  # type: ignore[import-not-found]

DOCS = [{"id": "t", "title": "Tower", "text": "The Eiffel Tower is in Paris, France. It was built in 1889."},
        {"id": "o", "text": "Oxygen has atomic number 8. It is a gas at room temperature."}]
LEFT: dict[str, float] = {}  # what the stub upstream saw: request tag -> when its client (the proxy) went away
REPLY = {"id": "x", "object": "chat.completion", "created": 0, "model": "stub",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}


def fault_stub() -> FastAPI:
    """An upstream whose requests name their behaviour in `user`: "fast", "slow:<s>", or "hang:<tag>" (answer
    never; record when the caller disconnects), streamed or not."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": "stub", "object": "model", "created": 0, "owned_by": "x"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        what = str(body.get("user", "fast"))
        if what.startswith("slow:"):
            await asyncio.sleep(float(what[5:]))
        if body.get("stream"):
            async def events() -> Any:
                try:
                    for i in range(10_000 if what.startswith("hang:") else 3):
                        chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "stub",
                                 "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                        await asyncio.sleep(0.05)
                    yield "data: [DONE]\n\n"
                finally:
                    if what.startswith("hang:"):
                        LEFT[what[5:]] = time.monotonic()
            return StreamingResponse(events(), media_type="text/event-stream")
        if what.startswith("hang:"):
            while not await request.is_disconnected():
                await asyncio.sleep(0.02)
            LEFT[what[5:]] = time.monotonic()
            return {}
        return REPLY

    return app


def chat_body(user: str = "fast", stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "Where is the tower?"}], "documents": DOCS,
            "user": user, "stream": stream, "max_tokens": 8, **extra}


@pytest.fixture(scope="module")
def stub(live_server: ServerFactory) -> LiveServer:
    return live_server(fault_stub())


def proxy_config(stub: LiveServer, **cfg: Any) -> ServerConfig:
    return ServerConfig(**{"upstream": f"{stub.url}/v1", "method": "truncate", "rate": 0.5, "tokenizer": "whitespace",
                           **cfg})


def test_a_burst_waits_in_the_queue_and_every_request_is_served(live_server: ServerFactory, stub: LiveServer) -> None:
    server = live_server(create_app(proxy_config(stub, max_concurrency=2, queue_depth=32, queue_timeout_s=20)))

    async def burst() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)

        async def one(i: int) -> str:
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"q{i}"}], stream=True, user="slow:0.2",
                extra_body={"documents": DOCS})
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        return await asyncio.gather(*(one(i) for i in range(20)), return_exceptions=True)

    results = asyncio.run(burst())
    assert results == ["t0 t1 t2 "] * 20  # no 429 at all: 18 of them waited for one of the 2 slots
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "ragzip_rejected_total" not in metrics or 'reason="busy"' not in metrics
    assert httpx.get(f"{server.url}/healthz").json()["queued"] == 0


def test_a_full_queue_and_a_long_wait_answer_429_with_retry_after(live_server: ServerFactory,
                                                                    stub: LiveServer) -> None:
    server = live_server(create_app(proxy_config(stub, max_concurrency=1, queue_depth=1, queue_timeout_s=1.0)))
    out: dict[str, httpx.Response] = {}
    holder = threading.Thread(target=lambda: out.update(
        held=httpx.post(f"{server.url}/v1/chat/completions", json=chat_body("slow:2.5"), timeout=20)))
    holder.start()
    wait_for(lambda: httpx.get(f"{server.url}/healthz").json()["in_flight"] == 1, what="the slot to be taken")
    waiter = threading.Thread(target=lambda: out.update(
        waited=httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(), timeout=20)))
    waiter.start()
    wait_for(lambda: httpx.get(f"{server.url}/healthz").json()["queued"] == 1, what="a request to queue")
    full = httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(), timeout=20)
    assert full.status_code == 429 and full.json()["error"]["code"] == "server_busy"
    assert "queue_depth=1" in full.json()["error"]["message"] and int(full.headers["retry-after"]) >= 1
    waiter.join(timeout=20)
    holder.join(timeout=20)
    assert out["waited"].status_code == 429 and "queue_timeout_s=1" in out["waited"].json()["error"]["message"]
    assert out["held"].status_code == 200
    assert httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(), timeout=20).status_code == 200


def test_rate_limits_are_per_key() -> None:
    cfg = ServerConfig(upstream="http://127.0.0.1:9/v1", method="truncate", tokenizer="whitespace",
                       api_keys=["sk-a", "sk-b"], rate_limit_rps=0.5, rate_limit_burst=2)
    record = {"question": "q", "contexts": DOCS}
    with TestClient(create_app(cfg)) as client:
        a = [client.post("/v1/compress", json=record, headers={"authorization": "Bearer sk-a"}) for _ in range(3)]
        assert [r.status_code for r in a] == [200, 200, 429]
        assert a[2].json()["error"]["code"] == "rate_limited" and int(a[2].headers["retry-after"]) >= 1
        b = client.post("/v1/compress", json=record, headers={"x-api-key": "sk-b"})
        assert b.status_code == 200  # another key has its own bucket
        assert client.get("/healthz").status_code == 200  # probes are never limited
        assert 'ragzip_rejected_total{reason="rate_limited"} 1.0' in client.get("/metrics").text


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_client_that_leaves_cancels_the_upstream_call(live_server: ServerFactory, stub: LiveServer,
                                                        stream: bool) -> None:
    server = live_server(create_app(proxy_config(stub, max_concurrency=1, queue_depth=0)))
    tag = f"leave-{stream}"
    url = f"{server.url}/v1/chat/completions"
    with httpx.Client(timeout=httpx.Timeout(30, read=0.7)) as client:
        if stream:
            with client.stream("POST", url, json=chat_body(f"hang:{tag}", stream=True)) as r:
                lines = r.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post(url, json=chat_body(f"hang:{tag}"))
    left = time.monotonic()  # the connection is closed here
    wait_for(lambda: tag in LEFT, timeout_s=5, what="the upstream request to be cancelled")
    assert LEFT[tag] - left < 1.0
    wait_for(lambda: httpx.get(f"{server.url}/healthz").json()["in_flight"] == 0, timeout_s=1.0,
             what="the slot to be freed")
    assert httpx.post(url, json=chat_body(), timeout=10).status_code == 200  # the one slot is free again
    assert "ragzip_client_disconnects_total" in httpx.get(f"{server.url}/metrics").text


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_client_that_leaves_stops_local_generation(live_server: ServerFactory, engine: LocalEngine,
                                                     stream: bool) -> None:
    cfg = ServerConfig(method="none", tokenizer="whitespace", max_new_tokens=400, default_max_new_tokens=400,
                       max_concurrency=1, queue_depth=0)
    server = live_server(create_app(cfg, engine=engine))
    backend = server.server.config.app.state.ragzip.backend  # type: ignore[attr-defined]
    body = {"messages": [{"role": "user", "content": "Write a very long story about a dragon and a knight."}],
            "max_tokens": 400, "stream": stream}
    with httpx.Client(timeout=httpx.Timeout(60, read=1.5)) as client:
        if stream:
            with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()
                next(line for line in lines if line.startswith("data:"))
                next(line for line in lines if line.startswith("data:"))
                assert backend.lock.locked()  # generating while the client leaves
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post(f"{server.url}/v1/chat/completions", json=body)
            assert backend.lock.locked()
    left = time.monotonic()
    assert backend.lock.acquire(timeout=5.0), "generation went on after the client left"
    stopped = time.monotonic() - left
    backend.lock.release()
    assert stopped < 1.0, f"generation stopped {stopped:.2f} s after the client left"
    wait_for(lambda: httpx.get(f"{server.url}/healthz").json()["in_flight"] == 0, timeout_s=1.0,
             what="the slot to be freed")


def test_upstream_down_then_back(live_server: ServerFactory) -> None:
    upstream = LiveServer(fault_stub())
    port = upstream.port
    server = live_server(create_app(proxy_config(upstream, upstream_timeout_s=2, readiness_timeout_s=0.5)))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
    try:
        wait_for(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, timeout_s=30.0,
                 what="the compressor to load")
        assert httpx.get(f"{server.url}/readyz").json() == {"status": "ready", "checks": {"compressor": "ok",
                                                                                        "upstream": "ok"}}
        assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}]).choices
        upstream.stop()
        time.sleep(1.1)  # readiness results are cached for a second
        for stream in (False, True):
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as exc:
                client.chat.completions.create(model="m", stream=stream, messages=[{"role": "user", "content": "Hi"}])
            assert exc.value.status_code == 502 and exc.value.code == "upstream_unreachable"
            assert time.monotonic() - started < 3
        ready = httpx.get(f"{server.url}/readyz")
        assert ready.status_code == 503 and "unreachable" in ready.json()["checks"]["upstream"]
        assert httpx.get(f"{server.url}/healthz").status_code == 200  # alive, just not ready
        upstream = LiveServer(fault_stub(), port=port)
        time.sleep(1.1)
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert reply.choices[0].message.content == "ok"
        chunks = client.chat.completions.create(model="m", stream=True, messages=[{"role": "user", "content": "x"}])
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "t0 t1 t2 "
    finally:
        upstream.stop()


def _kv_chat(client: TestClient, docs: list[dict[str, str]]) -> dict[str, Any]:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Where is the tower?"}],
                                                  "documents": docs, "max_tokens": 4})
    assert r.status_code == 200, r.text
    return r.json()["ragzip"]["kv"]  # type: ignore[no-any-return]


def test_redis_killed_and_restarted_under_the_kv_path(engine: LocalEngine, redis_server: dict[str, Any]) -> None:
    cfg = ServerConfig(method="none", tokenizer="whitespace", kv_store=redis_server["url"], kv_mode="blend")
    with TestClient(create_app(cfg, engine=engine)) as client:
        store = client.app.state.ragzip.backend.kv_engine.store  # type: ignore[attr-defined]
        store.retry_after_s = 0.5  # how long a failed server is skipped before it is tried again
        wait_for(lambda: client.get("/readyz").status_code == 200, timeout_s=30.0, what="the compressor to load")
        assert client.get("/readyz").json()["checks"] == {"compressor": "ok", "engine": "ok", "kv_store": "ok"}
        assert (_kv_chat(client, DOCS)["misses"], _kv_chat(client, DOCS)["hits"]) == (2, 2)
        redis_server["kill"]()
        kv = _kv_chat(client, DOCS)  # answered by recomputing: no client error
        assert (kv["hits"], kv["misses"]) == (0, 2)
        assert store.stats()["errors"] >= 1
        time.sleep(1.1)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["kv_store"] != "ok"
        redis_server["start"]()
        time.sleep(1.1)
        assert client.get("/readyz").status_code == 200
        assert _kv_chat(client, DOCS)["misses"] == 2  # a fresh, empty Redis: computed and stored again
        assert _kv_chat(client, DOCS)["hits"] == 2


@pytest.fixture()
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "kv"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_store_refuses_writes_and_reads_go_on(engine: LocalEngine, small_tmpfs: Path) -> None:
    cfg = ServerConfig(method="none", tokenizer="whitespace", kv_store=f"disk:{small_tmpfs}", kv_mode="blend")
    with TestClient(create_app(cfg, engine=engine)) as client:
        store = client.app.state.ragzip.backend.kv_engine.store  # type: ignore[attr-defined]
        assert _kv_chat(client, DOCS[:1])["misses"] == 1
        assert _kv_chat(client, DOCS[:1])["hits"] == 1
        with open(small_tmpfs / "filler", "wb", buffering=0) as fh:  # fill the rest of the disk
            try:
                while fh.write(b"\0" * 4096):
                    pass
            except OSError:
                pass
        errors = store.stats()["errors"]
        for _ in range(2):
            kv = _kv_chat(client, DOCS)  # the stored document still loads; the new one cannot be written
            assert (kv["hits"], kv["misses"]) == (1, 1)
        assert store.stats()["errors"] >= errors + 2
        assert not list((small_tmpfs / ".tmp").iterdir())  # no half-written files left behind
        assert client.get("/readyz").status_code == 200  # reads go on: still ready


def test_documents_too_large_are_refused_before_any_work() -> None:
    cfg = ServerConfig(upstream="http://127.0.0.1:9/v1", method="exit", tokenizer="whitespace",
                       max_document_chars=100_000, max_context_chars=150_000)
    big = "word " * 1_200_000  # 6 MB
    with TestClient(create_app(cfg)) as client:
        r = client.post("/v1/compress", json={"question": "q", "contexts": [{"text": big}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "document_too_large"
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": f"<documents>\n{big[:500_000]}\n</documents>\nq"}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "document_too_large"
        two = [{"text": big[:90_000]}, {"text": big[:90_000]}]
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "q"}],
                                                      "documents": two})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_too_large"
        r = client.post("/v1/documents", json={"documents": [{"text": big[:200_000]}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "document_too_large"
        assert 'ragzip_tokens_before_total{method="exit"}' not in client.get("/metrics").text  # nothing compressed


def test_start_refuses_a_bad_model_store_or_method(tmp_path: Path) -> None:
    runner = CliRunner()
    cases = [
        (["--llm", str(tmp_path / "no-such-model")], "no-such-model"),
        (["--config", str(_config(tmp_path, kv_store="ftp://x"))], "kv_store"),
        (["--config", str(_config(tmp_path, kv_store=f"redis://127.0.0.1:{free_port()}/0"))], "does not answer"),
        (["--method", "nope"], "unknown method"),
    ]
    for args, message in cases:
        res = runner.invoke(cli_app, ["serve", "--port", str(free_port()), *args])
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, (args, res.output)


def _config(tmp_path: Path, **cfg: Any) -> Path:
    path = tmp_path / f"server{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps({"method": "none", "tokenizer": "whitespace", **cfg}))
    return path


def test_sigterm_drains_in_flight_requests_and_exits_0(stub: LiveServer) -> None:
    from ragzip.eval.harness import ProxyProcess

    proxy = ProxyProcess({"upstream": f"{stub.url}/v1", "method": "none", "tokenizer": "whitespace"})
    try:
        out: dict[str, Any] = {}
        inflight = threading.Thread(target=lambda: out.update(r=httpx.post(
            f"{proxy.url}/v1/chat/completions", json=chat_body("slow:2"), timeout=30)))
        inflight.start()
        wait_for(lambda: httpx.get(f"{proxy.url}/healthz").json()["in_flight"] == 1, what="the request to start")
        proxy.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # new connections are refused while draining
            httpx.post(f"{proxy.url}/v1/chat/completions", json=chat_body(), timeout=5)
        inflight.join(timeout=30)
        assert out["r"].status_code == 200 and out["r"].json()["choices"][0]["message"]["content"] == "ok"
        assert proxy.proc.wait(timeout=30) == 0
    finally:
        proxy.stop()


def test_logs_hold_no_document_text_or_keys(caplog: pytest.LogCaptureFixture, stub: LiveServer) -> None:
    secret_text = "Zanzibar-7731 is the vault code."
    key = "sk-very-secret-key-123"
    docs = [{"id": "s", "text": secret_text}]
    failing = ServerConfig(upstream="http://127.0.0.1:9/v1", method="embed-topk", tokenizer="whitespace",
                           api_keys=[key], options={"embedder": f"/nonexistent/{secret_text}"})
    caplog.set_level("DEBUG", logger="ragzip")
    headers = {"authorization": f"Bearer {key}"}
    with TestClient(create_app(failing)) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "q"}],
                                                      "documents": docs}, headers=headers)
        assert r.status_code == 502  # compression fell back, then the upstream (port 9) is unreachable
        broken = client.post("/v1/compress", json={"question": "q", "contexts": docs}, headers=headers)
        # the server's own embedder is missing: its fault, not the request's
        assert broken.status_code == 500 and broken.json()["error"]["code"] == "compressor_unavailable"
        assert client.post("/v1/compress", json={"question": 1, "contexts": docs}, headers=headers).status_code == 400
        assert client.post("/v1/compress", json={"contexts": docs}, headers={"authorization": "Bearer "
                                                 + key[:-1]}).status_code == 401
    with TestClient(create_app(proxy_config(stub, api_keys=[key]))) as client:
        assert client.post("/v1/chat/completions", json=chat_body(), headers=headers).status_code == 200
    assert caplog.records, "expected the failures above to be logged"
    assert "Zanzibar" not in caplog.text and key not in caplog.text and key[:-1] not in caplog.text


def test_a_redis_password_never_reaches_messages_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    from ragzip.kvstore.stores.redis import RedisStore

    store = RedisStore(f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0", timeout_s=0.2)
    problem = store.reachable()
    assert problem is not None and "127.0.0.1" in problem and "hunter2" not in problem
    assert "hunter2" not in str(store.stats()["last_error"]) and "hunter2" not in caplog.text
