"""The gateway: the compression result cache, on_overload policies and compress_timeout_ms, per-key policies, state
shared through a real Redis by two apps (as two workers would), Redis killed mid-run, and `ragzip serve --workers`
as real processes (a killed worker is restarted, SIGTERM drains and exits 0)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

import ragzip.server.compression as compression_module
from ragzip.eval.harness import free_port, worker_pids
from ragzip.server.app import create_app
from ragzip.server.config import KeyPolicy, ServerConfig
from ragzip.server.metrics import Metrics
from ragzip.server.result_cache import ResultCache, cache_key, encode
from ragzip.types import Document

from .conftest import LiveServer, ServerFactory, echo_upstream, wait_for

TEXT = ("The tower is in Paris. It was built in 1889. Bread is baked from dough. Rivers flow to the sea. "
        "The museum opens at nine. Oxygen is an element.")
RECORD = {"question": "Where is the tower?", "contexts": [{"id": "a", "title": "Tower", "text": TEXT},
                                                          {"id": "b", "text": "Bread is eaten everywhere. " * 5}]}


@pytest.fixture(scope="module")
def upstream(live_server: ServerFactory) -> tuple[LiveServer, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    return live_server(echo_upstream(seen)), seen


def client_for(upstream: tuple[LiveServer, list[dict[str, Any]]], **cfg: Any) -> TestClient:
    base: dict[str, Any] = {"upstream": f"{upstream[0].url}/v1", "method": "truncate", "tokenizer": "whitespace",
                            "warm_compressor": False}
    return TestClient(create_app(ServerConfig(**{**base, **cfg})))


def chat(client: TestClient, headers: dict[str, str] | None = None, **ragzip: Any) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": RECORD["question"]}],
            "documents": RECORD["contexts"], **({"ragzip": ragzip} if ragzip else {})}
    return client.post("/v1/chat/completions", json=body, headers=headers or {})


def metric(client: TestClient, name: str) -> float:
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- the result cache ------------------------------------------------------------------------------------------

def test_a_repeated_request_is_answered_from_the_cache(upstream: Any) -> None:
    with client_for(upstream) as client:
        first = client.post("/v1/compress", json={**RECORD, "ragzip": {"rate": 0.5}})
        second = client.post("/v1/compress", json={**RECORD, "ragzip": {"rate": 0.5}})
        assert first.headers["x-ragzip-result-source"] == "compressor"
        assert second.headers["x-ragzip-result-source"] == "cache" and second.content == first.content
        assert metric(client, 'ragzip_cache_hits_total{cache="result"}') == 1
        assert metric(client, 'ragzip_compress_seconds_count{method="truncate"}') == 1  # the compressor ran once
        r1, r2 = chat(client, rate=0.4), chat(client, rate=0.4)
        assert r1.json()["ragzip"]["result_source"] == "compressor" and r2.json()["ragzip"]["result_source"] == "cache"
        assert r2.headers["x-ragzip-result-source"] == "cache"
        assert r1.json()["ragzip"]["tokens_after"] == r2.json()["ragzip"]["tokens_after"]
        assert upstream[1][-1]["messages"] == upstream[1][-2]["messages"]  # the LLM got the same prompt


@pytest.mark.parametrize("change", ["question", "text", "doc_id", "budget", "method", "options"])
def test_anything_that_decides_the_result_is_in_the_key(upstream: Any, change: str) -> None:
    with client_for(upstream, allow_request_options=True) as client:
        base = {**RECORD, "ragzip": {"rate": 0.5}}
        assert client.post("/v1/compress", json=base).headers["x-ragzip-result-source"] == "compressor"
        other = json.loads(json.dumps(base))
        if change == "question":
            other["question"] = "Where is the bread?"
        elif change == "text":
            other["contexts"][1]["text"] += " More."
        elif change == "doc_id":
            other["contexts"][0]["id"] = "a2"
        elif change == "budget":
            other["ragzip"] = {"rate": 0.6}
        elif change == "method":
            other["ragzip"]["method"] = "random"
        else:
            other["ragzip"] = {"method": "random", "rate": 0.5, "options": {"seed": 7}}
            client.post("/v1/compress", json={**other, "ragzip": {"method": "random", "rate": 0.5,
                                                                   "options": {"seed": 8}}})
        assert client.post("/v1/compress", json=other).headers["x-ragzip-result-source"] == "compressor"


def test_new_weights_do_not_answer_from_old_entries(upstream: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with client_for(upstream) as client:
        assert client.post("/v1/compress", json=RECORD).headers["x-ragzip-result-source"] == "compressor"
        assert client.post("/v1/compress", json=RECORD).headers["x-ragzip-result-source"] == "cache"
        monkeypatch.setattr(compression_module, "weights_revision", lambda: "retrained")
        assert client.post("/v1/compress", json=RECORD).headers["x-ragzip-result-source"] == "compressor"


@pytest.mark.parametrize("entry", [b"not json", b'{"format": 1}', "foreign", "wrong_format", "bad_shape"])
def test_bad_or_foreign_entries_are_dropped_and_recomputed(upstream: Any, entry: Any) -> None:
    with client_for(upstream) as client:
        fresh = client.post("/v1/compress", json=RECORD)
        cache = client.app.state.ragzip.compression.cache  # type: ignore[attr-defined]
        (key,) = cache._entries
        good = json.loads(cache._entries[key])
        if entry == "foreign":
            entry = encode("rc:another-request", good["compressed"])
        elif entry == "wrong_format":
            entry = json.dumps({**good, "format": 99}).encode()
        elif entry == "bad_shape":
            entry = encode(key, {**good["compressed"], "contexts": [{"id": 1, "text": None}]})
        cache._entries[key] = entry
        again = client.post("/v1/compress", json=RECORD)
        assert again.status_code == 200 and again.headers["x-ragzip-result-source"] == "compressor"
        assert again.json()["compressed"]["contexts"] == fresh.json()["compressed"]["contexts"]
        assert metric(client, 'ragzip_cache_misses_total{cache="result_invalid"}') == 1
        assert client.post("/v1/compress", json=RECORD).headers["x-ragzip-result-source"] == "cache"  # rewritten


def test_the_memory_cache_is_bounded_by_bytes() -> None:
    import asyncio

    metrics = Metrics()
    cache = ResultCache(2000, metrics)
    docs = [Document("d", "x")]
    keys = [cache_key(documents=docs, question=f"q{i}", method="m", budget={}, tokenizer="t", options={},
                      revision="r") for i in range(20)]
    obj = {"method": "m", "contexts": [{"id": "d", "title": "", "text": "y" * 300}], "text": "y" * 300,
           "tokens_before": 2, "tokens_after": 1}

    async def fill() -> list[Any]:
        for k in keys:
            await cache.put(k, obj)
        return [await cache.get(k) for k in keys]

    got = asyncio.run(fill())
    assert 0 < cache.bytes <= 2000 and got[-1] == obj and got[0] is None  # the oldest went first
    assert cache.bytes == sum(len(v) for v in cache._entries.values())


def test_result_cache_off(upstream: Any) -> None:
    with client_for(upstream, result_cache_mb=0) as client:
        for _ in range(2):
            assert client.post("/v1/compress", json=RECORD).headers["x-ragzip-result-source"] == "compressor"


# --- on_overload and compress_timeout_ms ---------------------------------------------------------------------------

def overload(client: TestClient) -> None:
    """Make the compressor look 100 s behind (100 pending x 1 s): the admission check, without a real backlog."""
    service = client.app.state.ragzip.compression  # type: ignore[attr-defined]
    service._pending, service._per_request_s = 100, 1.0


def test_overload_uncompressed_forwards_the_whole_context(upstream: Any) -> None:
    with client_for(upstream, on_overload="uncompressed") as client:
        overload(client)
        r = chat(client, rate=0.3)
        info = r.json()["ragzip"]
        assert r.status_code == 200 and r.headers["x-ragzip-fallback"] == "overload"
        assert info["fallback_reason"] == "overload" and info["method"] == "none" and info["rate"] == 1.0
        prompt = upstream[1][-1]["messages"][-1]["content"]
        assert TEXT in prompt  # every document whole
        assert metric(client, 'ragzip_compress_overload_total{policy="uncompressed"}') == 1
        # /v1/compress has nothing to forward: it is told to retry
        r = client.post("/v1/compress", json=RECORD)
        assert r.status_code == 429 and r.json()["error"]["code"] == "compressor_busy" and r.headers["retry-after"]


def test_overload_reject_is_an_immediate_429(upstream: Any) -> None:
    with client_for(upstream, on_overload="reject") as client:
        overload(client)
        started = time.perf_counter()
        r = chat(client, rate=0.3)
        assert r.status_code == 429 and r.json()["error"]["code"] == "compressor_busy"
        assert 1 <= int(r.headers["retry-after"]) <= 60 and time.perf_counter() - started < 2
        # a request may choose its own policy, and the cache still answers when the compressor is busy
        assert chat(client, rate=0.3, on_overload="uncompressed").headers["x-ragzip-fallback"] == "overload"


def test_overload_queue_waits_and_compresses(upstream: Any) -> None:
    with client_for(upstream) as client:
        overload(client)
        r = chat(client, rate=0.3)
        assert r.status_code == 200 and "x-ragzip-fallback" not in r.headers
        assert r.json()["ragzip"]["method"] == "truncate"
        assert metric(client, 'ragzip_compress_overload_total{policy="queue"}') == 1


def test_a_cached_result_is_served_even_when_overloaded(upstream: Any) -> None:
    with client_for(upstream, on_overload="reject") as client:
        assert chat(client, rate=0.3).status_code == 200
        overload(client)
        r = chat(client, rate=0.3)
        assert r.status_code == 200 and r.json()["ragzip"]["result_source"] == "cache"


def test_compress_timeout_forwards_uncompressed(upstream: Any) -> None:
    # exit's first call loads its encoder (seconds): far past a 1 ms timeout
    with client_for(upstream, method="exit", tokenizer=None, compress_timeout_ms=1) as client:
        r = chat(client, rate=0.3)
        assert r.status_code == 200 and r.headers["x-ragzip-fallback"] == "timeout"
        assert r.json()["ragzip"]["fallback_reason"] == "timeout" and TEXT in upstream[1][-1]["messages"][-1]["content"]
        r = client.post("/v1/compress", json=RECORD)
        assert r.status_code == 504 and r.json()["error"]["code"] == "compression_timeout"
        assert metric(client, "ragzip_compress_timeouts_total") == 2


# --- per-key policies --------------------------------------------------------------------------------------------

def test_each_key_gets_its_own_method_budget_policy_and_limit(upstream: Any) -> None:
    keys = {"sk-a": KeyPolicy(method="random", rate=0.5), "sk-off": KeyPolicy(compress=False),
            "sk-fast": KeyPolicy(on_overload="uncompressed"), "sk-slow": KeyPolicy(rate_limit_rps=0.5,
                                                                                 rate_limit_burst=2)}
    with client_for(upstream, keys=keys, api_keys=["sk-plain"], on_overload="reject") as client:
        def h(key: str) -> dict[str, str]:
            return {"authorization": f"Bearer {key}"}

        assert chat(client).status_code == 401
        a = chat(client, h("sk-a")).json()["ragzip"]
        plain = chat(client, h("sk-plain")).json()["ragzip"]
        assert a["method"] == "random" and a["budget"]["rate"] == 0.5 and plain["method"] == "truncate"
        assert chat(client, h("sk-a"), method="truncate", rate=0.2).json()["ragzip"]["method"] == "truncate"
        assert client.post("/v1/compress", json=RECORD, headers=h("sk-plain")).status_code == 200  # now cached
        opted_out = client.post("/v1/compress", json=RECORD, headers=h("sk-off"))
        assert opted_out.headers["x-ragzip-result-source"] == "none"
        assert opted_out.json()["compressed"]["method"] == "none"
        off = chat(client, h("sk-off"))
        assert off.json()["ragzip"]["method"] == "none" and off.json()["ragzip"]["result_source"] == "none"
        assert TEXT in upstream[1][-1]["messages"][-1]["content"]
        slow = [chat(client, h("sk-slow"), rate=0.1 + i / 100) for i in range(4)]
        assert [r.status_code for r in slow] == [200, 200, 429, 429]  # its own limit: burst 2, then 0.5/s
        assert slow[2].json()["error"]["code"] == "rate_limited" and chat(client, h("sk-plain")).status_code == 200
        overload(client)
        fast = chat(client, h("sk-fast"), rate=0.31)
        assert fast.headers.get("x-ragzip-fallback") == "overload", fast.text
        refused = chat(client, h("sk-plain"), rate=0.32)  # the server's policy: reject
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "compressor_busy"


# --- shared state in Redis ------------------------------------------------------------------------------------------

@pytest.fixture()
def two_workers(upstream: Any, redis_server: dict[str, Any]) -> Iterator[tuple[TestClient, TestClient]]:
    """Two apps sharing one Redis, as two worker processes (or replicas) would."""
    keys = {"sk-r": KeyPolicy(rate_limit_rps=0.2, rate_limit_burst=3), "sk-u": KeyPolicy()}
    with client_for(upstream, shared=redis_server["url"], keys=keys) as a, \
            client_for(upstream, shared=redis_server["url"], keys=keys) as b:
        yield a, b


def test_two_workers_share_the_result_cache_byte_for_byte(two_workers: tuple[TestClient, TestClient]) -> None:
    a, b = two_workers
    h = {"authorization": "Bearer sk-r"}
    first = a.post("/v1/compress", json=RECORD, headers=h)
    second = b.post("/v1/compress", json=RECORD, headers=h)
    assert first.headers["x-ragzip-result-source"] == "compressor"
    assert second.headers["x-ragzip-result-source"] == "cache" and second.content == first.content


def test_a_key_limit_holds_across_workers(two_workers: tuple[TestClient, TestClient]) -> None:
    a, b = two_workers
    h = {"authorization": "Bearer sk-r"}
    statuses = [(a if i % 2 else b).post("/v1/compress", json=RECORD, headers=h).status_code for i in range(6)]
    assert statuses.count(200) == 3 and statuses.count(429) == 3  # the burst of 3, not 3 per worker


def test_the_index_is_shared(two_workers: tuple[TestClient, TestClient]) -> None:
    a, b = two_workers
    h = {"authorization": "Bearer sk-r"}
    ra = a.post("/v1/documents", json={"documents": ["The tower is in Paris. It is tall."]}, headers=h).json()
    rb = b.post("/v1/documents", json={"documents": [{"text": "Bread is baked from dough.", "title": "B"}]},
                headers=h).json()
    assert ra["ids"] != rb["ids"]  # one id space
    for client in (a, b):
        listed = client.get("/v1/documents", headers=h).json()
        assert listed["total"] == 2 and [d["id"] for d in listed["data"]] == ra["ids"] + rb["ids"]
    r = b.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content":
                                             "Where is the tower?"}], "ragzip": {"method": "none"}}, headers=h)
    assert r.json()["ragzip"]["source"] == "index"
    assert a.delete("/v1/documents", headers=h).json()["deleted_documents"] == 2
    assert b.get("/v1/documents", headers=h).json()["total"] == 0


def test_redis_killed_mid_run_falls_back_to_local_state(upstream: Any, redis_server: dict[str, Any]) -> None:
    with client_for(upstream, shared=redis_server["url"]) as client:
        assert client.post("/v1/compress", json=RECORD).status_code == 200
        redis_server["kill"]()
        started = time.perf_counter()
        statuses = [client.post("/v1/compress", json={**RECORD, "question": f"q{i}"}).status_code for i in range(5)]
        statuses += [chat(client, rate=0.3).status_code for _ in range(3)]
        assert statuses == [200] * 8 and time.perf_counter() - started < 10
        assert metric(client, "ragzip_shared_errors_total") >= 1
        assert metric(client, "ragzip_shared_up") == 0
        assert client.post("/v1/compress", json=RECORD).headers["x-ragzip-result-source"] == "cache"  # its own
        ready = client.get("/readyz").json()
        assert ready["checks"]["shared"].startswith("degraded")
        redis_server["start"]()
        wait_for(lambda: client.get("/readyz").json()["checks"]["shared"] == "ok", timeout_s=10, what="redis back")


# --- worker processes ----------------------------------------------------------------------------------------------

@pytest.fixture()
def serve_workers(tmp_path: Path, upstream: Any) -> Iterator[Any]:
    """Start `ragzip serve` with 2 workers in front of the echo upstream (config keys added to the base); yields
    a starter returning (process, url, log path) once both workers run; stopped (SIGTERM, then kill) after."""
    started: list[subprocess.Popen[bytes]] = []

    def start(**extra: Any) -> tuple[subprocess.Popen[bytes], str, Path]:
        port = free_port()
        cfg = tmp_path / "server.json"
        cfg.write_text(json.dumps({"upstream": f"{upstream[0].url}/v1", "method": "truncate",
                                   "tokenizer": "whitespace", "workers": 2, "warm_compressor": False, **extra}))
        log = tmp_path / "serve.log"
        with log.open("w") as out:
            proc = subprocess.Popen([str(Path(sys.executable).with_name("ragzip")), "serve", "--port", str(port),
                                     "--config", str(cfg)], stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "HF_HUB_OFFLINE": "1"})
        started.append(proc)
        url = f"http://127.0.0.1:{port}"

        def serving() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200 and len(worker_pids(proc.pid)) >= 2
            except httpx.HTTPError:
                return False

        wait_for(serving, timeout_s=120, what="two workers")
        return proc, url, log

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_serve_workers_restarts_a_killed_worker_and_drains_on_sigterm(serve_workers: Any) -> None:
    proc, url, log = serve_workers()
    assert "without 'shared'" in log.read_text()  # N workers without Redis say what is not shared
    workers = worker_pids(proc.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    wait_for(lambda: len(worker_pids(proc.pid)) == 2 and workers[0] not in worker_pids(proc.pid), timeout_s=60,
             what="the killed worker to be replaced")
    statuses = [httpx.post(f"{url}/v1/compress", json=RECORD, timeout=30).status_code for _ in range(6)]
    assert statuses == [200] * 6
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert all(not Path(f"/proc/{w}").exists() for w in workers[1:])


def test_the_documented_configs_are_valid() -> None:
    """Every server.json on docs/surfaces.md loads as a ServerConfig (the docs cannot drift from the config)."""
    import re

    page = (Path(__file__).resolve().parents[2] / "docs" / "surfaces.md").read_text(encoding="utf-8")
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", page, re.DOTALL) if '"upstream"' in b]
    assert len(blocks) >= 2
    for block in blocks:
        ServerConfig(**block)


def test_concurrent_syncs_apply_each_shared_entry_once(two_workers: tuple[TestClient, TestClient],
                                                        redis_server: dict[str, Any]) -> None:
    import asyncio

    import redis

    a, b = two_workers
    h = {"authorization": "Bearer sk-u"}
    a.post("/v1/documents", json={"documents": ["The tower is in Paris."]}, headers=h)
    assert b.get("/v1/documents", headers=h).json()["total"] == 1  # b is in sync; then more arrive
    for text in ("Bread is baked from dough.", "Rivers flow to the sea."):
        a.post("/v1/documents", json={"documents": [text]}, headers=h)
    # a damaged and a foreign entry in the log are skipped, never fatal
    redis.Redis.from_url(redis_server["url"]).rpush("ragzip:index:log:0", b"not json", b'["op", "add"]')
    a.post("/v1/documents", json={"documents": ["Oxygen is an element."]}, headers=h)
    index = b.app.state.ragzip.index  # type: ignore[attr-defined]

    async def many() -> list[Any]:
        return list(await asyncio.gather(*(index.list(0, 100) for _ in range(6))))

    pages = b.portal.call(many)  # type: ignore[union-attr]
    assert all(total == 4 for _, total in pages) and index.size == 4  # no entry applied twice
    a.post("/v1/documents", json={"documents": ["The museum opens at nine."]}, headers=h)
    assert b.get("/v1/documents", headers=h).json()["total"] == 5  # and none skipped after
    r = b.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content":
                                             "Where is the tower?"}], "ragzip": {"method": "none"}}, headers=h)
    assert r.status_code == 200 and r.json()["ragzip"]["source"] == "index"


def test_a_fresh_worker_retrieves_shared_documents_and_a_clear_starts_a_generation(
        upstream: Any, redis_server: dict[str, Any]) -> None:
    cfg = {"shared": redis_server["url"]}
    with client_for(upstream, **cfg) as a:
        a.post("/v1/documents", json={"documents": ["Old news about bread."]})
        a.delete("/v1/documents")
        a.post("/v1/documents", json={"documents": ["The tower is in Paris."]})
        with client_for(upstream, **cfg) as late:  # never added nor listed: its first chat must see the index
            r = late.post("/v1/chat/completions", json={"model": "m", "messages": [
                {"role": "user", "content": "Where is the tower?"}], "ragzip": {"method": "none"}})
            assert r.json()["ragzip"]["source"] == "index"
            texts = [c["text"] for c in late.get("/v1/documents/doc-1").json().get("chunks", [])]
            assert late.get("/v1/documents").json()["total"] == 1 and "bread" not in " ".join(texts)


def test_a_request_cannot_loosen_the_overload_policy_to_queue(upstream: Any) -> None:
    with client_for(upstream, on_overload="reject") as client:
        r = chat(client, rate=0.3, on_overload="queue")
        assert r.status_code == 400 and r.json()["error"]["param"] == "ragzip.on_overload"
    with client_for(upstream, on_overload="reject", allow_request_options=True) as client:
        overload(client)
        assert chat(client, rate=0.3, on_overload="queue").status_code == 200


def test_a_failing_cache_key_never_fails_the_request(upstream: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> str:
        raise OSError("weights unreadable")

    monkeypatch.setattr(compression_module, "weights_revision", broken)
    with client_for(upstream) as client:
        r = chat(client, rate=0.3)
        assert r.status_code == 200 and r.json()["ragzip"]["method"] == "truncate"
        assert client.post("/v1/compress", json=RECORD).status_code == 200


def test_worker_processes_share_a_key_limit_and_the_cache_through_redis(serve_workers: Any,
                                                                        redis_server: dict[str, Any]) -> None:
    _, url, _ = serve_workers(shared=redis_server["url"],
                              keys={"sk-r": {"rate_limit_rps": 0.01, "rate_limit_burst": 3}})
    time.sleep(1.0)  # both workers accepting
    # 20 requests on new connections, spread over both processes: a burst of 3 in all, not 3 per worker
    answers = [httpx.post(f"{url}/v1/compress", json=RECORD, headers={"authorization": "Bearer sk-r"}, timeout=30)
               for _ in range(20)]
    served = [r for r in answers if r.status_code == 200]
    assert len(served) == 3 and all(r.status_code == 429 for r in answers if r.status_code != 200)
    assert [r.headers["x-ragzip-result-source"] for r in served] == ["compressor", "cache", "cache"]
    assert len({r.content for r in served}) == 1
