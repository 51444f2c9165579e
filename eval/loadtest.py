"""Bounded load and chaos test of the ragzip proxy on loopback.

Starts `ragzip serve` (subprocess) in front of a fast stub upstream (its own subprocess) or the local engine, then
runs `--concurrency` async clients for `--seconds` over a mix of requests (chat, streamed chat, /v1/compress).
Clients behave as the official SDKs do: a 429 is retried after its `Retry-After`. With `--chaos`, the upstream is
killed (SIGKILL) a third of the way in and started again `--down-s` later; requests are then split into those that
overlapped the outage and the rest. Reports throughput, latency percentiles of served requests, status counts,
5xx and transport errors, client timeouts, and the server's RSS sampled through the run. Usage:

    .venv/bin/python -m ragzip.eval.loadtest --seconds 60 --concurrency 200 --method exit --chaos --json load.json
    .venv/bin/python -m ragzip.eval.loadtest --backend local --seconds 60 --concurrency 16 --json local.json

`scripts/load_chaos.py` runs the README's set of runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx

from ragzip.eval.harness import ProxyProcess, StubUpstream

WORDS = ("paris tower iron bread flour oxygen element museum river city built year design metres "
         "history people world known famous capital north south light water").split()
KINDS = ("chat", "stream", "compress")
MAX_SECONDS = 600.0


def documents(rng: random.Random, n: int = 5, words: int = 120) -> list[dict[str, str]]:
    docs = []
    for i in range(n):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(words // 12)]
        docs.append({"id": f"d{i}", "title": f"Doc {i}", "text": " ".join(sentences)})
    return docs


@dataclass(slots=True)
class Result:
    started: float  # seconds since the run began
    seconds: float
    kind: str
    status: int  # 0: a transport failure; -1: the client's own timeout
    retry_after: float = 0.0


async def one(client: httpx.AsyncClient, kind: str, rng: random.Random, rate: float) -> httpx.Response:
    docs = documents(rng)
    if kind == "compress":
        return await client.post("/v1/compress", json={"question": "where is the tower?", "contexts": docs,
                                                       "ragzip": {"rate": rate}})
    body = {"model": "m", "messages": [{"role": "user", "content": "Where is the tower?"}], "documents": docs,
            "ragzip": {"rate": rate}, "stream": kind == "stream", "max_tokens": 8}
    if kind == "stream":
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            async for _ in r.aiter_lines():
                pass
            return r
    return await client.post("/v1/chat/completions", json=body)


async def run(url: str, seconds: float, concurrency: int, rate: float, seed: int, *,
              client_timeout_s: float = 60.0, on_tick: Any = None) -> list[Result]:
    """`concurrency` clients sending back to back for `seconds`; each 429 is retried after its Retry-After."""
    results: list[Result] = []
    t0 = time.monotonic()
    deadline = t0 + seconds

    async def worker(i: int) -> None:
        rng = random.Random(seed + i)
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, timeout=client_timeout_s, limits=limits) as client:
            await asyncio.sleep(rng.random() * min(1.0, seconds / 10))  # clients arrive over the first second
            while time.monotonic() < deadline:
                kind = rng.choice(KINDS)
                start = time.monotonic()
                retry_after = 0.0
                try:
                    r = await one(client, kind, rng, rate)
                    status = r.status_code
                    if status == 429:
                        retry_after = float(r.headers.get("retry-after", "1"))
                except httpx.TimeoutException:
                    status = -1
                except httpx.HTTPError:
                    status = 0
                results.append(Result(start - t0, time.monotonic() - start, kind, status, retry_after))
                if retry_after:
                    await asyncio.sleep(min(retry_after, max(0.0, deadline - time.monotonic())))

    async def ticker() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            if on_tick is not None:
                on_tick(time.monotonic() - t0)

    await asyncio.gather(ticker(), *(worker(i) for i in range(concurrency)))
    return results


def _pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0] * 1000, 1)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000, 1)


def summarize(results: list[Result], wall: float) -> dict[str, Any]:
    served = [r.seconds for r in results if r.status == 200]
    statuses = Counter(r.status for r in results)
    return {"requests": len(results), "served": len(served), "seconds": round(wall, 2),
            "rps": round(len(results) / wall, 1), "served_rps": round(len(served) / wall, 1),
            "p50_ms": _pct(served, 50), "p95_ms": _pct(served, 95), "p99_ms": _pct(served, 99),
            "p99_ms_all": _pct([r.seconds for r in results], 99),
            "max_ms": round(max(served) * 1000, 1) if served else None,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "rejected_429": statuses.get(429, 0),
            "server_errors": sum(v for k, v in statuses.items() if k >= 500 or k == 0),
            "client_timeouts": statuses.get(-1, 0),
            "by_kind": {k: sum(1 for r in results if r.kind == k and r.status == 200) for k in KINDS}}


class RssSampler:
    """The proxy's RSS every `every_s` seconds, in a thread."""

    def __init__(self, proxy: ProxyProcess, every_s: float = 2.0) -> None:
        self.proxy, self.every_s = proxy, every_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((round(time.monotonic() - self._t0, 1), round(self.proxy.rss_mb(), 1)))
            except OSError:
                return
            self._stop.wait(self.every_s)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(timeout=5)
        if not self.samples:
            return {}
        end = self.samples[-1][0]
        tail = [mb for t, mb in self.samples if t >= end - 30]
        return {"rss_mb_start": self.samples[0][1], "rss_mb_end": self.samples[-1][1],
                "rss_mb_max": max(mb for _, mb in self.samples),
                "rss_mb_change_last_30s": round(tail[-1] - tail[0], 1), "rss_samples": self.samples}


def chaos_split(results: list[Result], down_at: float, up_at: float, grace_s: float) -> dict[str, Any]:
    """Requests that overlapped the outage (started before the upstream was back plus `grace_s`, ended after it
    went down) against all the others: the others must have no 5xx at all."""
    def overlapped(r: Result) -> bool:
        return r.started < up_at + grace_s and r.started + r.seconds > down_at

    during = [r for r in results if overlapped(r)]
    outside = [r for r in results if not overlapped(r)]
    after = sorted((r for r in results if r.started >= up_at and r.status == 200), key=lambda r: r.started)
    uses_upstream = [r for r in during if r.kind != "compress"]
    return {"down_at_s": round(down_at, 1), "up_at_s": round(up_at, 1), "grace_s": grace_s,
            "during": summarize(during, max(up_at - down_at, 1e-9)) if during else None,
            "outside": summarize(outside, 1.0) if outside else None,
            "server_errors_outside": sum(1 for r in outside if r.status >= 500 or r.status == 0),
            "chat_answered_502_504_during": sum(1 for r in uses_upstream if r.status in (502, 504)),
            "compress_served_during": sum(1 for r in during if r.kind == "compress" and r.status == 200),
            "first_served_after_restart_s": round(after[0].started - up_at, 2) if after else None,
            "longest_request_s": round(max((r.seconds for r in results), default=0.0), 2)}


def load_run(*, backend: str = "stub", seconds: float = 30.0, concurrency: int = 8, method: str = "exit",
             rate: float = 0.5, max_concurrency: int = 8, queue_depth: int = 64, queue_timeout_s: float = 10.0,
             tokenizer: str | None = None, chaos: bool = False, down_s: float = 5.0, seed: int = 0,
             upstream_timeout_s: float = 10.0) -> dict[str, Any]:
    """One bounded run (see the module doc); returns the figures."""
    seconds = min(seconds, MAX_SECONDS)
    if chaos and backend != "stub":
        raise ValueError("--chaos kills the stub upstream; use --backend stub")
    stub = StubUpstream() if backend == "stub" else None
    cfg: dict[str, Any] = {"method": method, "max_concurrency": max_concurrency, "queue_depth": queue_depth,
                           "queue_timeout_s": queue_timeout_s, "upstream_timeout_s": upstream_timeout_s,
                           "upstream_connect_timeout_s": 2.0}
    if stub is not None:
        cfg["upstream"] = stub.url
    else:
        cfg.update(max_new_tokens=8, default_max_new_tokens=8)
    if tokenizer:
        cfg["tokenizer"] = tokenizer
    proxy = ProxyProcess(cfg)
    events: dict[str, float] = {}

    def on_tick(t: float) -> None:  # the chaos schedule, on the run's own clock
        if not chaos or stub is None:
            return
        if "down" not in events and t >= seconds / 3:
            events["down"] = t
            stub.kill()
        elif "down" in events and "restarting" not in events and t >= events["down"] + down_s:
            events["restarting"] = t
            began = time.monotonic()

            def restart() -> None:  # in a thread: waiting for the stub to answer must not stall the clients
                stub.start()
                events["up"] = t + time.monotonic() - began
            threading.Thread(target=restart, daemon=True).start()

    try:
        asyncio.run(run(proxy.url, 3.0, 2, rate, seed + 1000))  # warm-up: models, caches
        sampler = RssSampler(proxy)
        started = time.monotonic()
        results = asyncio.run(run(proxy.url, seconds, concurrency, rate, seed, on_tick=on_tick,
                                  client_timeout_s=queue_timeout_s + upstream_timeout_s + 30))
        wall = time.monotonic() - started
        rss = sampler.stop()
        ready = httpx.get(f"{proxy.url}/readyz", timeout=5).json()["status"]
        metrics = httpx.get(f"{proxy.url}/metrics", timeout=5).text
    finally:
        proxy.stop()
        if stub is not None:
            stub.stop()
    out: dict[str, Any] = {"backend": backend, "method": method, "rate": rate, "concurrency": concurrency,
                           "max_concurrency": max_concurrency, "queue_depth": queue_depth,
                           "queue_timeout_s": queue_timeout_s, "seconds": seconds, **summarize(results, wall),
                           **{k: v for k, v in rss.items() if k != "rss_samples"}, "ready_at_end": ready,
                           "rejected_by_reason": _rejected(metrics), "rss_samples": rss.get("rss_samples", [])}
    if chaos:
        out["chaos"] = chaos_split(results, events.get("down", seconds), events.get("up", seconds), 2.0)
    return out


def _rejected(metrics: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in metrics.splitlines():
        if line.startswith("ragzip_rejected_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('reason="')[1].split('"')[0]] = int(float(value))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["stub", "local"], default="stub")
    ap.add_argument("--seconds", type=float, default=30.0, help=f"load duration (max {MAX_SECONDS:g})")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    ap.add_argument("--max-concurrency", type=int, default=8, help="the server's slots")
    ap.add_argument("--queue-depth", type=int, default=64, help="the server's wait queue")
    ap.add_argument("--queue-timeout", type=float, default=10.0, help="the server's longest queue wait (s)")
    ap.add_argument("--method", default="exit")
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--tokenizer", default=None, help="budget tokenizer (default: the local LLM's)")
    ap.add_argument("--chaos", action="store_true", help="kill and restart the stub upstream during the run")
    ap.add_argument("--down-s", type=float, default=5.0, help="how long the upstream stays down")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = load_run(backend=args.backend, seconds=args.seconds, concurrency=args.concurrency, method=args.method,
                   rate=args.rate, max_concurrency=args.max_concurrency, queue_depth=args.queue_depth,
                   queue_timeout_s=args.queue_timeout, tokenizer=args.tokenizer, chaos=args.chaos,
                   down_s=args.down_s, seed=args.seed)
    print(json.dumps({k: v for k, v in out.items() if k != "rss_samples"}, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
