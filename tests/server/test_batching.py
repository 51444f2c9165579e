"""The proxy batches concurrent compressions: real uvicorn server, concurrent clients, results equal to one-by-one
calls in Python, and a bad request among them fails alone."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from ragzip import RagZip
from ragzip.server.app import create_app
from ragzip.server.config import ServerConfig

QUESTIONS = [
    ("Where is the tower?", ["The tower is in Paris. It is made of iron. Bread is baked from dough."]),
    ("Who wrote Hamlet?", ["Hamlet is a tragedy. Shakespeare wrote it around 1600.",
                           "Paris is the capital of France. It has many museums."]),
    ("What is bread made of?", ["Bread is baked from dough. Dough is flour and water. The tower is tall."]),
    ("When was Hamlet written?", ["Shakespeare wrote Hamlet around 1600. It is set in Denmark."]),
]


def test_concurrent_requests_are_batched_and_return_what_single_calls_return(live_server: Any) -> None:
    config = ServerConfig(upstream="http://127.0.0.1:9/v1", method="exit", options={"dtype": "float32"},
                          batch_window_ms=100, max_batch=8, warm_compressor=False)
    app = create_app(config)
    server = live_server(app)
    bodies = [{"question": q, "contexts": [{"id": f"d{j}", "text": t} for j, t in enumerate(docs)],
               "ragzip": {"rate": 0.5}} for q, docs in QUESTIONS]
    bodies.insert(2, {**bodies[0], "ragzip": {"rate": 0.5, "threshold": 0.5}})  # refused before batching

    def post(body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/compress", json=body, timeout=120)

    post(bodies[0])  # loads the model, so the concurrent ones arrive together
    service = app.state.ragzip.compression
    _, batcher = service._entry(service.plan(None))
    before = batcher.batches
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(post, bodies))
    assert responses[2].status_code == 400, responses[2].text
    good = [r.json()["compressed"] for i, r in enumerate(responses) if i != 2]
    assert all(r.status_code == 200 for i, r in enumerate(responses) if i != 2)
    assert batcher.largest > 1 and batcher.batches - before < len(bodies)  # some requests shared a batch
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    sizes = re.search(r"^ragzip_compress_batch_size_count (\S+)$", metrics, re.M)
    assert sizes is not None and float(sizes.group(1)) == batcher.batches
    rz = RagZip("exit", dtype="float32", counter=service.counter)
    for (q, docs), got in zip(QUESTIONS, good):
        want = rz.compress(q, [{"id": f"d{j}", "text": t} for j, t in enumerate(docs)], 0.5)
        assert got["text"] == want.text
        assert got["tokens_after"] == want.tokens_after


def test_a_bad_request_inside_a_batch_fails_alone() -> None:
    """Requests that reach the same batch: the malformed one gets its own error, the others their results."""
    from ragzip.server.compression import CompressionService
    from ragzip.server.metrics import Metrics

    config = ServerConfig(upstream="http://127.0.0.1:9/v1", method="exit", options={"dtype": "float32"},
                          tokenizer="whitespace", batch_window_ms=100, max_batch=8, warm_compressor=False)
    service = CompressionService(config, Metrics(), tokenizer="whitespace")
    plan = service.plan(None)
    service.pipeline(plan)  # built before the clock starts
    calls: list[Any] = [(q, [{"id": f"d{j}", "text": t} for j, t in enumerate(docs)]) for q, docs in QUESTIONS]
    calls.insert(1, ("Where?", [{"id": "x", "title": "a document without text"}]))

    def run(call: Any) -> Any:
        try:
            return service._run(plan, *call)
        except Exception as exc:  # noqa: BLE001 - the point: which request got which error
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        out = list(pool.map(run, calls))
    _, batcher = service._entry(plan)
    assert batcher.largest > 1
    from ragzip.errors import InputError

    assert isinstance(out[1], InputError)
    rz = RagZip("exit", dtype="float32", tokenizer="whitespace")
    for (q, docs), got in zip([c for i, c in enumerate(calls) if i != 1], [o for i, o in enumerate(out) if i != 1]):
        assert got.text == rz.compress(q, docs, plan.budget).text
