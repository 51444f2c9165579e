"""Bounded load test of the ragzip proxy on loopback.

Starts a fast stub upstream and `ragzip serve` (subprocess), then runs `--concurrency` async clients for
`--seconds` over a mix of requests (chat, streamed chat, /v1/compress), and prints throughput, latency
percentiles, status counts and the server's RSS. Usage:

    .venv/bin/python -m ragzip.eval.loadtest --seconds 30 --concurrency 8 --method truncate --json /tmp/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter
from typing import Any

import httpx

from ragzip.eval.harness import ProxyProcess, StubUpstream

WORDS = ("paris tower iron bread flour oxygen element museum river city built year design metres "
         "history people world known famous capital north south light water").split()


def documents(rng: random.Random, n: int = 5, words: int = 120) -> list[dict[str, str]]:
    docs = []
    for i in range(n):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(words // 12)]
        docs.append({"id": f"d{i}", "title": f"Doc {i}", "text": " ".join(sentences)})
    return docs


async def one(client: httpx.AsyncClient, kind: str, rng: random.Random, rate: float) -> int:
    docs = documents(rng)
    if kind == "compress":
        r = await client.post("/v1/compress", json={"question": "where is the tower?", "contexts": docs,
                                                    "ragzip": {"rate": rate}})
        return r.status_code
    body = {"model": "m", "messages": [{"role": "user", "content": "Where is the tower?"}], "documents": docs,
            "ragzip": {"rate": rate}, "stream": kind == "stream", "max_tokens": 8}
    if kind == "stream":
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            async for _ in r.aiter_lines():
                pass
            return r.status_code
    r = await client.post("/v1/chat/completions", json=body)
    return r.status_code


async def run(url: str, seconds: float, concurrency: int, rate: float, seed: int) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    kinds = ["chat", "stream", "compress"]
    deadline = time.monotonic() + seconds

    async def worker(i: int) -> None:
        rng = random.Random(seed + i)
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                try:
                    status = await one(client, rng.choice(kinds), rng, rate)
                except httpx.HTTPError:
                    status = 0  # a transport failure
                latencies.append(time.perf_counter() - start)
                statuses[status] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    wall = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {"requests": len(latencies), "seconds": round(wall, 2), "rps": round(len(latencies) / wall, 1),
            "p50_ms": round(q[49] * 1000, 1), "p95_ms": round(q[94] * 1000, 1), "p99_ms": round(q[98] * 1000, 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "server_errors": sum(v for k, v in statuses.items() if k >= 500 or k == 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="load duration (max 600)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-concurrency", type=int, default=8, help="the server's limit (429 above it)")
    ap.add_argument("--method", default="truncate")
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--tokenizer", default=None, help="budget tokenizer (default: the local LLM's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    seconds = min(args.seconds, 600.0)
    stub = StubUpstream()
    cfg: dict[str, Any] = {"upstream": stub.url, "method": args.method, "max_concurrency": args.max_concurrency}
    if args.tokenizer:
        cfg["tokenizer"] = args.tokenizer
    proxy = ProxyProcess(cfg)
    try:
        asyncio.run(run(proxy.url, 3.0, 2, args.rate, args.seed + 1000))  # warm-up: models, caches
        rss_before = proxy.rss_mb()
        result = asyncio.run(run(proxy.url, seconds, args.concurrency, args.rate, args.seed))
        rss_after = proxy.rss_mb()
        # A second round of the same length: memory must not keep growing with requests served.
        result2 = asyncio.run(run(proxy.url, seconds, args.concurrency, args.rate, args.seed + 1))
        rss_end = proxy.rss_mb()
    finally:
        proxy.stop()
        stub.stop()
    out = {"method": args.method, "concurrency": args.concurrency, "max_concurrency": args.max_concurrency,
           "round1": result, "round2": result2, "rss_mb_after_warmup": round(rss_before, 1),
           "rss_mb_after_round1": round(rss_after, 1), "rss_mb_after_round2": round(rss_end, 1)}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
