"""Bounded load and chaos test of the ragzip proxy on loopback.

Starts `ragzip serve` (subprocess; `--workers N`, `--shared redis://...`) in front of a fast stub upstream (its own
subprocess) or the local engine, then sends a mix of requests (`--kinds`: chat, streamed chat, /v1/compress) for
`--seconds`, either closed-loop (`--concurrency` clients back to back; a 429 is retried after its `Retry-After`, as
the official SDKs do) or open-loop (`--arrival-rps`: Poisson arrivals at that rate whatever the server does, no
retries). `--repeat-rate` sends that share of requests with documents and question already sent (the result
cache's case). With `--chaos`, the upstream is killed (SIGKILL) a third of the way in and started again `--down-s`
later; requests are then split into those that overlapped the outage and the rest. Reports throughput, latency
percentiles of served requests, status counts, 5xx and transport errors, client timeouts, fallbacks
(x-ragzip-fallback), result sources and the server's RSS (workers included) sampled through the run. Usage:

    .venv/bin/python -m ragzip.eval.loadtest --seconds 60 --concurrency 200 --method exit --chaos --json load.json
    .venv/bin/python -m ragzip.eval.loadtest --kinds chat --arrival-rps 20 --workers 2 --on-overload uncompressed
    .venv/bin/python -m ragzip.eval.loadtest --backend local --seconds 60 --concurrency 16 --json local.json

`scripts/load_chaos.py` runs the proxy's load and chaos set; `scripts/gateway_bench.py` the gateway's (workers,
Redis, result cache, overload policies, LiteLLM's proxy side by side).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx

from ragzip.eval.harness import ProxyProcess, StubUpstream, free_port, worker_pids

WORDS = ("paris tower iron bread flour oxygen element museum river city built year design metres "
         "history people world known famous capital north south light water").split()
KINDS = ("chat", "stream", "compress")
MAX_SECONDS = 600.0
MAX_OUTSTANDING = 2000  # open loop: requests in flight at most (every loop bounded)


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
    status: int  # 0: a transport failure; -1: the client's own timeout; -2: not sent (open loop at its bound)
    retry_after: float = 0.0
    fallback: str = ""  # x-ragzip-fallback
    source: str = ""  # x-ragzip-result-source
    error: str = ""  # the error code of a 5xx answer, or the transport error's type


class Workload:
    """What each request sends: a kind from `kinds`, fresh documents or (at `repeat_rate`) a set already sent with
    the same question, and the budget `rate`. `documents=False` sends plain chat (passthrough)."""

    def __init__(self, kinds: tuple[str, ...] = KINDS, rate: float = 0.5, *, repeat_rate: float = 0.0,
                 documents: bool = True, model: str = "m") -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be among {KINDS}, got {kinds}")
        if not 0 <= repeat_rate <= 1:
            raise ValueError("repeat_rate must be in [0, 1]")
        self.kinds, self.rate, self.repeat_rate, self.documents, self.model = kinds, rate, repeat_rate, documents, model
        self._sent: list[list[dict[str, str]]] = []

    def next(self, rng: random.Random) -> tuple[str, dict[str, Any]]:
        kind = rng.choice(self.kinds)
        docs: list[dict[str, str]] = []
        if kind == "compress" or self.documents:
            if self._sent and rng.random() < self.repeat_rate:
                docs = rng.choice(self._sent)
            else:
                docs = documents(rng)
                self._sent = [*self._sent[-255:], docs]
        if kind == "compress":
            return kind, {"question": "where is the tower?", "contexts": docs, "ragzip": {"rate": self.rate}}
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": "Where is the tower?"}],
                                "stream": kind == "stream", "max_tokens": 8}
        if self.documents:
            body.update(documents=docs, ragzip={"rate": self.rate})
        return kind, body


async def send(client: httpx.AsyncClient, kind: str, body: dict[str, Any]) -> httpx.Response:
    if kind == "compress":
        return await client.post("/v1/compress", json=body)
    if kind == "stream":
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            async for _ in r.aiter_lines():
                pass
            return r
    return await client.post("/v1/chat/completions", json=body)


async def _timed(client: httpx.AsyncClient, kind: str, body: dict[str, Any], t0: float) -> Result:
    start = time.monotonic()
    retry_after, fallback, source, error = 0.0, "", "", ""
    try:
        r = await send(client, kind, body)
        status = r.status_code
        fallback, source = r.headers.get("x-ragzip-fallback", ""), r.headers.get("x-ragzip-result-source", "")
        if status == 429:
            retry_after = float(r.headers.get("retry-after", "1"))
        elif status >= 500:
            error = _error_code(r)
    except httpx.TimeoutException:
        status = -1
    except httpx.HTTPError as exc:
        status, error = 0, type(exc).__name__
    return Result(start - t0, time.monotonic() - start, kind, status, retry_after, fallback, source, error)


def _error_code(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"].get("code") or r.json()["error"].get("type"))
    except (ValueError, KeyError, TypeError, AttributeError, httpx.ResponseNotRead):
        return f"http {r.status_code}"


async def _ticker(deadline: float, t0: float, on_tick: Any) -> None:
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        if on_tick is not None:
            on_tick(time.monotonic() - t0)


async def run(url: str, seconds: float, concurrency: int, rate: float, seed: int, *,
              client_timeout_s: float = 60.0, on_tick: Any = None, workload: Workload | None = None,
              headers: dict[str, str] | None = None) -> list[Result]:
    """`concurrency` clients sending back to back for `seconds`; each 429 is retried after its Retry-After."""
    workload = workload or Workload(rate=rate)
    results: list[Result] = []
    t0 = time.monotonic()
    deadline = t0 + seconds

    async def worker(i: int) -> None:
        rng = random.Random(seed + i)
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, timeout=client_timeout_s, limits=limits,
                                     headers=headers) as client:
            await asyncio.sleep(rng.random() * min(1.0, seconds / 10))  # clients arrive over the first second
            while time.monotonic() < deadline:
                result = await _timed(client, *workload.next(rng), t0)
                results.append(result)
                if result.retry_after:
                    await asyncio.sleep(min(result.retry_after, max(0.0, deadline - time.monotonic())))

    await asyncio.gather(_ticker(deadline, t0, on_tick), *(worker(i) for i in range(concurrency)))
    return results


async def open_loop(url: str, seconds: float, arrival_rps: float, workload: Workload, seed: int, *,
                    client_timeout_s: float = 60.0, on_tick: Any = None, headers: dict[str, str] | None = None,
                    max_outstanding: int = MAX_OUTSTANDING) -> list[Result]:
    """Requests arriving at `arrival_rps` (Poisson) for `seconds`, each sent whatever the server does (no retries);
    an arrival finding `max_outstanding` requests unanswered is not sent and counts as status -2."""
    rng = random.Random(seed)
    results: list[Result] = []
    t0 = time.monotonic()
    deadline = t0 + seconds
    limits = httpx.Limits(max_connections=max_outstanding, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=client_timeout_s, limits=limits, headers=headers) as client:
        tasks: set[asyncio.Task[Result]] = set()
        ticker = asyncio.create_task(_ticker(deadline, t0, on_tick))
        at = t0
        while True:
            at += rng.expovariate(arrival_rps)
            if at >= deadline:
                break
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            kind, body = workload.next(rng)
            if len(tasks) >= max_outstanding:
                results.append(Result(at - t0, 0.0, kind, -2))
                continue
            task = asyncio.create_task(_timed(client, kind, body, t0))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(lambda t: results.append(t.result()))
        if tasks:
            await asyncio.wait(tasks)
        await ticker
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
            "p50_ms_429": _pct([r.seconds for r in results if r.status == 429], 50),
            "server_errors": sum(v for k, v in statuses.items() if k >= 500 or k == 0),
            "client_timeouts": statuses.get(-1, 0), "not_sent": statuses.get(-2, 0),
            "by_kind": {k: sum(1 for r in results if r.kind == k and r.status == 200) for k in KINDS},
            "fallbacks": dict(Counter(r.fallback for r in results if r.fallback)),
            "result_sources": dict(Counter(r.source for r in results if r.source)),
            "errors": dict(Counter(f"{r.kind}: {r.error}" for r in results if r.error))}


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
             upstream_timeout_s: float = 10.0, kinds: tuple[str, ...] = KINDS, arrival_rps: float | None = None,
             repeat_rate: float = 0.0, documents: bool = True, workers: int = 1, threads: int | None = None,
             shared: str | None = None, fault: str | None = None, warmup_s: float = 3.0,
             server: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """One bounded run (see the module doc); returns the figures. `fault`: "redis" kills the run's own Redis (given
    with shared="own") or "worker" kills one worker process (SIGKILL) a third of the way in. `server`: more
    config keys for the proxy."""
    seconds = min(seconds, MAX_SECONDS)
    if chaos and backend != "stub":
        raise ValueError("--chaos kills the stub upstream; use --backend stub")
    if fault not in (None, "redis", "worker") or (fault == "redis" and shared != "own"):
        raise ValueError("fault is redis (with shared='own') or worker")
    stub = StubUpstream() if backend == "stub" else None
    redis_proc = OwnRedis() if shared == "own" else None
    cfg: dict[str, Any] = {"method": method, "max_concurrency": max_concurrency, "queue_depth": queue_depth,
                           "queue_timeout_s": queue_timeout_s, "upstream_timeout_s": upstream_timeout_s,
                           "upstream_connect_timeout_s": 2.0, "workers": workers, **(server or {})}
    if redis_proc is not None or shared:
        cfg["shared"] = redis_proc.url if redis_proc is not None else shared
    if stub is not None:
        cfg["upstream"] = stub.url
    else:
        cfg.update(max_new_tokens=8, default_max_new_tokens=8)
    if tokenizer:
        cfg["tokenizer"] = tokenizer
    proxy = ProxyProcess(cfg, threads=threads)
    events: dict[str, Any] = {}

    def on_tick(t: float) -> None:  # the fault schedule, on the run's own clock
        if fault is not None and "fault" not in events and t >= seconds / 3:
            events["fault"] = t
            if fault == "redis" and redis_proc is not None:
                redis_proc.kill()
            elif fault == "worker":
                victims = worker_pids(proxy.proc.pid)
                if victims:
                    os.kill(victims[0], signal.SIGKILL)
                    events["killed_worker"] = victims[0]
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

    workload = Workload(kinds, rate, repeat_rate=repeat_rate, documents=documents)
    try:
        _wait_ready(proxy.url, workers)
        if warmup_s:  # models and caches; the repeat pool starts empty again
            asyncio.run(run(proxy.url, warmup_s, 2 * workers, rate, seed + 1000, headers=headers,
                            workload=Workload(kinds, rate, documents=documents)))
        sampler = RssSampler(proxy)
        started = time.monotonic()
        timeout = queue_timeout_s + upstream_timeout_s + 30
        if arrival_rps is None:
            results = asyncio.run(run(proxy.url, seconds, concurrency, rate, seed, on_tick=on_tick,
                                      client_timeout_s=timeout, workload=workload, headers=headers))
        else:
            results = asyncio.run(open_loop(proxy.url, seconds, arrival_rps, workload, seed, on_tick=on_tick,
                                            client_timeout_s=timeout, headers=headers))
        wall = time.monotonic() - started
        rss = sampler.stop()
        ready = httpx.get(f"{proxy.url}/readyz", timeout=5).json()["status"]
        metrics = httpx.get(f"{proxy.url}/metrics", timeout=5).text
        alive_workers = len(worker_pids(proxy.proc.pid)) if workers > 1 else 1
    finally:
        proxy.stop()
        if stub is not None:
            stub.stop()
        if redis_proc is not None:
            redis_proc.stop()
    out: dict[str, Any] = {"backend": backend, "method": method, "rate": rate, "concurrency": concurrency,
                           "arrival_rps": arrival_rps, "kinds": list(kinds), "repeat_rate": repeat_rate,
                           "workers": workers, "threads": threads, "shared": bool(cfg.get("shared")),
                           "max_concurrency": max_concurrency, "queue_depth": queue_depth,
                           "queue_timeout_s": queue_timeout_s, "seconds": seconds, **summarize(results, wall),
                           **{k: v for k, v in rss.items() if k != "rss_samples"}, "ready_at_end": ready,
                           "rejected_by_reason": _rejected(metrics), "shared_errors": _metric_sum(
                               metrics, "ragzip_shared_errors_total"), "rss_samples": rss.get("rss_samples", [])}
    if out["server_errors"]:  # the server's own account of its errors
        lines = proxy.log_text.splitlines()
        first = next((i for i, line in enumerate(lines) if "ERROR" in line), len(lines))
        out["server_log_errors"] = lines[first:first + 80]
    if chaos:
        out["chaos"] = chaos_split(results, events.get("down", seconds), events.get("up", seconds), 2.0)
    if fault is not None:
        at = events.get("fault", seconds)
        out["fault"] = {"kind": fault, "at_s": round(at, 1), "workers_at_end": alive_workers,
                        "errors_after_fault": sum(1 for r in results if r.started + r.seconds >= at
                                                  and (r.status >= 500 or r.status in (0, -1))),
                        "errors_before_fault": sum(1 for r in results if r.started + r.seconds < at
                                                   and (r.status >= 500 or r.status in (0, -1)))}
    return out


def _wait_ready(url: str, workers: int, timeout_s: float = 180.0) -> None:
    """Until /readyz answers ready on several probes in a row (each worker warms its compressor)."""
    deadline = time.monotonic() + timeout_s
    ready = 0
    while ready < 4 * workers:
        try:
            ready = ready + 1 if httpx.get(f"{url}/readyz", timeout=5).status_code == 200 else 0
        except httpx.HTTPError:
            ready = 0
        if time.monotonic() > deadline:
            raise TimeoutError("the proxy did not turn ready")
        time.sleep(0.1)


class OwnRedis:
    """A redis-server of the run's own on a free loopback port (so that killing it disturbs nobody)."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server is not installed (bash scripts/services.sh start installs it)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.TemporaryDirectory()
        self.proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                      "--appendonly", "no", "--dir", self.dir.name], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                             check=False).stdout.strip() != b"PONG":
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.kill()
        self.dir.cleanup()


def _metric_sum(metrics: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(name) and not line.startswith("#"))


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
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated request kinds: chat, stream, compress")
    ap.add_argument("--arrival-rps", type=float, default=None, help="open loop: Poisson arrivals per second "
                                                                     "(default: closed loop of --concurrency)")
    ap.add_argument("--repeat-rate", type=float, default=0.0, help="share of requests repeating one already sent")
    ap.add_argument("--no-documents", action="store_true", help="plain chat without documents (passthrough)")
    ap.add_argument("--workers", type=int, default=1, help="the server's worker processes")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: 1, or the cores "
                                                              "split between the workers)")
    ap.add_argument("--shared", default=None, help="redis://... for the workers' shared state, or 'own' for a Redis "
                                                   "of the run's own")
    ap.add_argument("--fault", choices=["redis", "worker"], default=None, help="kill the run's Redis (--shared "
                                                                               "own) or a worker a third of the way in")
    ap.add_argument("--on-overload", choices=["queue", "uncompressed", "reject"], default=None)
    ap.add_argument("--compress-wait-ms", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    server = {k: v for k, v in (("on_overload", args.on_overload), ("compress_wait_ms", args.compress_wait_ms))
              if v is not None}
    out = load_run(backend=args.backend, seconds=args.seconds, concurrency=args.concurrency, method=args.method,
                   rate=args.rate, max_concurrency=args.max_concurrency, queue_depth=args.queue_depth,
                   queue_timeout_s=args.queue_timeout, tokenizer=args.tokenizer, chaos=args.chaos,
                   down_s=args.down_s, seed=args.seed, kinds=tuple(args.kinds.split(",")),
                   arrival_rps=args.arrival_rps, repeat_rate=args.repeat_rate, documents=not args.no_documents,
                   workers=args.workers, threads=args.threads, shared=args.shared, fault=args.fault, server=server)
    print(json.dumps({k: v for k, v in out.items() if k != "rss_samples"}, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
