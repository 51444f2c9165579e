"""The gateway's figures (docs/surfaces.md, "Deploying the gateway"), in one bounded loopback run (~12 minutes on 2
cores): every server in front of the same fast stub upstream, one run at a time.

1. Passthrough (chat without documents): direct to the stub, through ragzip (1 and 2 workers) and through
   LiteLLM's own proxy (from .venv-litellm), closed loop (throughput) and open loop (added p50 latency).
2. EXIT-compressed chat capacity (closed loop, 32 clients): 1 worker x 1 thread (the previous harness's setup),
   1 worker x 2 threads, 2 workers, and 2 workers + Redis with half the requests repeated (the result cache).
3. Open loop at 80% of the 2-worker capacity (429s, p99/p50), and at 2x with on_overload uncompressed and reject.
4. The result cache: added latency of a hit (sequential, against passthrough), and byte-identical `compressed`
   objects from 2 workers sharing Redis.
5. A key's rate limit across 2 workers with and without Redis.
6. Faults: the Redis killed mid-run under 2 workers; a worker killed mid-run.

Usage:  .venv/bin/python scripts/gateway_bench.py --json docs/results/gateway.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from ragzip.eval.harness import LiteLLMProxy, ProxyProcess, StubUpstream
from ragzip.eval.loadtest import OwnRedis, Workload, _wait_ready, load_run, open_loop, run, summarize

SLOTS = {"max_concurrency": 64, "queue_depth": 256}  # the compressor's admission decides, not the request slots


def _brief(out: dict[str, Any]) -> dict[str, Any]:
    keep = ("requests", "served", "served_rps", "p50_ms", "p95_ms", "p99_ms", "rejected_429", "p50_ms_429",
            "server_errors", "client_timeouts", "not_sent", "fallbacks", "result_sources", "rss_mb_max",
            "statuses", "rejected_by_reason", "shared_errors", "fault", "errors")
    return {k: out[k] for k in keep if k in out}


def _measure(url: str, *, seconds: float, concurrency: int | None = None, arrival_rps: float | None = None,
             headers: dict[str, str] | None = None, model: str = "stub") -> dict[str, Any]:
    """Passthrough chat (no documents) against any OpenAI-compatible base URL (without /v1)."""
    workload = Workload(("chat",), documents=False, model=model)
    asyncio.run(run(url, 2.0, 4, 0.5, 999, workload=workload, headers=headers))  # warm-up
    started = time.monotonic()
    if arrival_rps is None:
        results = asyncio.run(run(url, seconds, concurrency or 32, 0.5, 0, workload=workload, headers=headers))
    else:
        results = asyncio.run(open_loop(url, seconds, arrival_rps, workload, 0, headers=headers))
    return _brief(summarize(results, time.monotonic() - started))


def passthrough(seconds: float, rps: float) -> dict[str, Any]:
    stub = StubUpstream()
    out: dict[str, Any] = {}
    try:
        base = stub.url.removesuffix("/v1")
        out["direct"] = {"closed": _measure(base, seconds=seconds), "open": _measure(base, seconds=seconds,
                                                                                    arrival_rps=rps)}
        for workers in (1, 2):
            proxy = ProxyProcess({"upstream": stub.url, "method": "truncate", "tokenizer": "whitespace",
                                  "workers": workers, "warm_compressor": False, **SLOTS})
            try:
                _wait_ready(proxy.url, workers)
                out[f"ragzip_{workers}w"] = {"closed": _measure(proxy.url, seconds=seconds),
                                             "open": _measure(proxy.url, seconds=seconds, arrival_rps=rps)}
            finally:
                proxy.stop()
        litellm = LiteLLMProxy(stub.url)
        try:
            auth = {"authorization": f"Bearer {litellm.master_key}"}
            out["litellm_1w"] = {"closed": _measure(litellm.url, seconds=seconds, headers=auth),
                                 "open": _measure(litellm.url, seconds=seconds, arrival_rps=rps, headers=auth)}
        finally:
            litellm.stop()
    finally:
        stub.stop()
    direct = out["direct"]["open"]["p50_ms"]
    out["added_p50_ms"] = {k: round(v["open"]["p50_ms"] - direct, 2) for k, v in out.items()
                           if k != "direct" and isinstance(v, dict) and "open" in v}
    return out


def exit_chat(seconds: float, **kw: Any) -> dict[str, Any]:
    return _brief(load_run(seconds=seconds, concurrency=kw.pop("concurrency", 32), method="exit", kinds=("chat",),
                           server={**SLOTS, **kw.pop("server", {})}, **kw))


def cache_latency(n: int = 60) -> dict[str, Any]:
    """Sequential requests: passthrough chat, then one chat with documents repeated (cache hits), on one worker."""
    stub = StubUpstream()
    proxy = ProxyProcess({"upstream": stub.url, "method": "exit", **SLOTS})
    try:
        _wait_ready(proxy.url, 1)
        plain = {"model": "stub", "messages": [{"role": "user", "content": "Where is the tower?"}], "max_tokens": 8}
        docs = Workload(("chat",)).next(random.Random(5))[1]
        timings: dict[str, list[float]] = {"passthrough": [], "cache_hit": []}
        with httpx.Client(base_url=proxy.url, timeout=60) as client:
            first = client.post("/v1/chat/completions", json=docs)
            assert first.headers.get("x-ragzip-result-source") == "compressor", first.text
            for i in range(2 * n):  # interleaved, so drift hits both alike
                kind = "passthrough" if i % 2 else "cache_hit"
                started = time.perf_counter()
                r = client.post("/v1/chat/completions", json=plain if kind == "passthrough" else docs)
                timings[kind].append(time.perf_counter() - started)
                assert r.status_code == 200 and (kind == "passthrough" or
                                                 r.headers["x-ragzip-result-source"] == "cache")
        p50 = {k: round(statistics.median(v) * 1000, 2) for k, v in timings.items()}
        return {"n": n, "p50_ms": p50, "hit_added_ms": round(p50["cache_hit"] - p50["passthrough"], 2),
                "compress_miss_ms": round(first.elapsed.total_seconds() * 1000, 1)}
    finally:
        proxy.stop()
        stub.stop()


def identical_across_workers(n: int = 20) -> dict[str, Any]:
    stub = StubUpstream()
    redis = OwnRedis()
    proxy = ProxyProcess({"upstream": stub.url, "method": "exit", "workers": 2, "shared": redis.url, **SLOTS})
    try:
        _wait_ready(proxy.url, 2)
        record = {"question": "where is the tower?", "contexts": Workload(("compress",)).next(
            random.Random(7))[1]["contexts"]}
        bodies, sources = [], []
        for _ in range(n):  # new connections: the kernel spreads them over both workers
            r = httpx.post(f"{proxy.url}/v1/compress", json=record, timeout=60)
            bodies.append(json.dumps(r.json()["compressed"], sort_keys=False))
            sources.append(r.headers["x-ragzip-result-source"])
        return {"n": n, "distinct_compressed_objects": len(set(bodies)),
                "sources": {s: sources.count(s) for s in set(sources)}}
    finally:
        proxy.stop()
        redis.stop()
        stub.stop()


def key_limit(seconds: float, rps: float = 5.0, shared: bool = True) -> dict[str, Any]:
    stub = StubUpstream()
    redis = OwnRedis() if shared else None
    cfg = {"upstream": stub.url, "method": "truncate", "tokenizer": "whitespace", "workers": 2,
           "warm_compressor": False, "keys": {"sk-k": {"rate_limit_rps": rps, "rate_limit_burst": 5}}, **SLOTS}
    if redis is not None:
        cfg["shared"] = redis.url
    proxy = ProxyProcess(cfg)
    try:
        _wait_ready(proxy.url, 2)
        started = time.monotonic()
        results = asyncio.run(run(proxy.url, seconds, 16, 0.5, 0, workload=Workload(("compress",)),
                                  headers={"authorization": "Bearer sk-k"}))
        wall = time.monotonic() - started
        served = sum(1 for r in results if r.status == 200)
        allowed = rps * wall + 5
        return {"limit_rps": rps, "burst": 5, "seconds": round(wall, 1), "served": served,
                "allowed": round(allowed, 1), "served_over_allowed": round(served / allowed, 3),
                "rejected_429": sum(1 for r in results if r.status == 429)}
    finally:
        proxy.stop()
        if redis is not None:
            redis.stop()
        stub.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only", default=None, help="comma-separated parts: passthrough,capacity,overload,cache,"
                                                 "limit,faults")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    s = args.seconds
    out: dict[str, Any] = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}

    def part(name: str) -> bool:
        return only is None or name in only

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")

    if part("passthrough"):
        out["passthrough"] = passthrough(s, rps=30.0)
        print("passthrough", json.dumps(out["passthrough"]["added_p50_ms"]), flush=True)
        save()
    if part("capacity"):
        out["capacity"] = {
            "1w_1t": exit_chat(s, threads=1),
            "1w_2t": exit_chat(s, threads=2),
            "2w": exit_chat(s, workers=2),
            "2w_redis_repeat50": exit_chat(s, workers=2, shared="own", repeat_rate=0.5),
        }
        print("capacity", {k: v["served_rps"] for k, v in out["capacity"].items()}, flush=True)
        save()
    if part("overload"):
        capacity = out["capacity"]["2w"]["served_rps"]
        out["overload"] = {
            "capacity_rps": capacity,
            "open_80pct": exit_chat(s * 1.5, workers=2, arrival_rps=0.8 * capacity),
            "open_2x_uncompressed": exit_chat(s, workers=2, arrival_rps=2 * capacity,
                                              server={"on_overload": "uncompressed"}),
            "open_2x_reject": exit_chat(s, workers=2, arrival_rps=2 * capacity, server={"on_overload": "reject"}),
        }
        print("overload", json.dumps({k: v if isinstance(v, float) else {x: v.get(x) for x in (
            "served", "p50_ms", "p99_ms", "rejected_429", "server_errors", "fallbacks")}
            for k, v in out["overload"].items()}), flush=True)
        save()
    if part("cache"):
        out["cache"] = {"latency": cache_latency(), "identical_across_workers": identical_across_workers()}
        print("cache", json.dumps(out["cache"]), flush=True)
        save()
    if part("limit"):
        out["key_limit"] = {"redis": key_limit(s), "no_redis": key_limit(s, shared=False)}
        print("limit", json.dumps(out["key_limit"]), flush=True)
        save()
    if part("faults"):
        capacity = out.get("capacity", {}).get("2w", {}).get("served_rps", 8.0)
        out["faults"] = {
            "redis_killed": exit_chat(s * 1.5, workers=2, shared="own", fault="redis", arrival_rps=0.5 * capacity),
            "worker_killed": exit_chat(s * 1.5, workers=2, fault="worker", arrival_rps=0.5 * capacity),
        }
        print("faults", json.dumps({k: {x: v.get(x) for x in ("served", "statuses", "fault", "shared_errors")}
                                    for k, v in out["faults"].items()}), flush=True)
        save()


if __name__ == "__main__":
    main()
