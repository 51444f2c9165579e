"""One ASGI middleware in front of every route: metrics, API-key auth, per-key rate limits, body size limit,
bounded concurrency with a bounded wait queue, and cancellation when the client goes away.

It is a plain ASGI middleware (not `BaseHTTPMiddleware`) so that streamed responses pass through untouched and a
concurrency slot stays held until the last byte of a stream is sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ragzip.server.config import ServerConfig
from ragzip.server.errors import error_body
from ragzip.server.metrics import Metrics
from ragzip.server.shared import SharedState

# Routes that do work: they count against the concurrency limit and need a key when keys are configured.
LIMITED = frozenset({"/v1/chat/completions", "/v1/compress", "/v1/documents"})
OPEN = frozenset({"/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"})
KNOWN = LIMITED | OPEN | {"/v1/models"}
_MAX_RATE_KEYS = 10_000  # distinct clients tracked by the rate limiter (least recently seen dropped first)


async def _send_error(send: Send, status: int, message: str, *, type: str, code: str,
                      headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(message, type=type, code=code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Slots:
    """`limit` requests in flight, up to `queue_depth` more waiting in FIFO order for at most a timeout.

    A finishing request hands its slot straight to the oldest waiter, so a burst is served in arrival order
    and nobody jumps the queue. Shared by the guard and the health routes. Single event loop only.
    """

    def __init__(self, limit: int = 8, queue_depth: int = 0) -> None:
        self.limit = limit
        self.queue_depth = queue_depth
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._service_s = 0.5  # moving average of a request's time in a slot, for Retry-After

    @property
    def queued(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free: the queue ahead divided by the rate slots free up."""
        ahead = self.queued + 1
        return max(1, min(60, math.ceil(self._service_s * ahead / self.limit)))

    async def acquire(self, timeout_s: float) -> str | None:
        """None when a slot is held (call `release` after), else why not: "queue_full", "overloaded" (the
        queue ahead would take longer than `timeout_s` to clear: refused now rather than after the wait) or
        "queue_timeout"."""
        if self.in_flight < self.limit and not self.queued:
            self.in_flight += 1
            return None
        if self.queued >= self.queue_depth or timeout_s <= 0:
            return "queue_full"
        if self._service_s * (self.queued + 1) / self.limit > timeout_s:
            return "overloaded"
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout_s)
            return None
        except TimeoutError:
            return "queue_timeout"
        except BaseException:  # cancelled (client gone): a slot handed over meanwhile goes to the next waiter
            if waiter.done() and not waiter.cancelled():
                self.release()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def release(self, held_s: float | None = None) -> None:
        if held_s is not None:
            self._service_s = 0.9 * self._service_s + 0.1 * held_s
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)  # the slot passes on: in_flight is unchanged
                return
        self.in_flight -= 1


class RateLimiter:
    """A token bucket per client: `rps` sustained, `burst` at once. Clients are identified by a digest of their
    key (never the key itself) or their address."""

    def __init__(self, rps: float, burst: int) -> None:
        self.rps = rps
        self.burst = float(burst)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, client: str, rps: float | None = None, burst: int | None = None) -> float:
        """0 when the request may go, else the seconds until it could (`rps`/`burst`: this client's own limit)."""
        rps = rps or self.rps
        cap = float(burst or self.burst)
        now = time.monotonic()
        tokens, last = self._buckets.pop(client, (cap, now))
        tokens = min(cap, tokens + (now - last) * rps)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / rps
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > _MAX_RATE_KEYS:
            self._buckets.popitem(last=False)
        return wait


class Guard:
    """Checks keys and rate limits, caps body bytes, holds work to `max_concurrency` slots plus a bounded queue
    (then 429 with Retry-After), and cancels a request's work when its client disconnects."""

    def __init__(self, app: ASGIApp, *, config: ServerConfig, metrics: Metrics, slots: Slots,
                 shared: Callable[[], SharedState | None] = lambda: None) -> None:
        self.app = app
        self.config = config
        self.metrics = metrics
        self.keys = [k.encode() for k in config.accepted_keys]
        self.slots = slots
        self.shared = shared  # the shared state once the app has started (None: each worker limits on its own)
        self.limiter = RateLimiter(config.rate_limit_rps or 1.0, config.rate_limit_burst)

    def _limit(self, key: bytes | None) -> tuple[float, int] | None:
        """(rps, burst) for requests with `key`: the key's own limit, else the server's; None when unlimited."""
        policy = self.config.keys.get(key.decode()) if key is not None else None
        rps = (policy.rate_limit_rps if policy else None) or self.config.rate_limit_rps
        if rps is None:
            return None
        return rps, (policy.rate_limit_burst if policy else None) or self.config.rate_limit_burst

    async def _rate_wait(self, client: str, rps: float, burst: int) -> float:
        shared = self.shared()
        if shared is not None:
            wait = await shared.rate_wait(client, rps, burst)
            if wait is not None:
                return wait
        return self.limiter.check(client, rps, burst)  # no shared state, or it failed: this worker's bucket

    def _key(self, scope: Scope) -> bytes | None:
        """The matching configured key, None when none matches (every key compared, in constant time each)."""
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        found = None
        for key in self.keys:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(given, key):
                found = key
        return found

    def _client_id(self, scope: Scope, key: bytes | None) -> str:
        if key is not None:
            return "key:" + hashlib.blake2b(key, digest_size=8).hexdigest()
        client = scope.get("client") or ("?", 0)
        return f"addr:{client[0]}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in KNOWN else "/v1/documents/{id}" if path.startswith("/v1/documents/") else "other"
        status = {"code": 500}
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_wrapper, path)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    async def _refuse(self, send: Send, status: int, reason: str, message: str, *, type: str, code: str,
                      headers: dict[str, str] | None = None) -> None:
        self.metrics.rejected.labels(reason).inc()
        await _send_error(send, status, message, type=type, code=code, headers=headers)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        key = None
        if path not in OPEN and self.keys:
            key = self._key(scope)
            if key is None:
                await self._refuse(send, 401, "auth", "missing or invalid API key (send 'Authorization: Bearer "
                                   "<key>')", type="invalid_request_error", code="invalid_api_key",
                                   headers={"www-authenticate": "Bearer"})
                return
        limit = self.config.max_body_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await self._refuse(send, 413, "too_large", f"request body larger than {limit} bytes",
                               type="invalid_request_error", code="request_too_large")
            return
        limited = path in LIMITED and scope.get("method") == "POST"
        if key is not None:  # the routes apply the key's own policy (`keys`): method, budget, on_overload
            scope.setdefault("state", {})["ragzip_key"] = self.config.keys.get(key.decode())
        key_limit = self._limit(key) if limited else None
        if key_limit is not None:
            rps, burst = key_limit
            wait = await self._rate_wait(self._client_id(scope, key), rps, burst)
            if wait > 0:
                await self._refuse(send, 429, "rate_limited", f"rate limit of {rps:g} requests/s (burst {burst}) "
                                   f"reached; retry after {wait:.1f} s", type="rate_limit_error", code="rate_limited",
                                   headers={"retry-after": str(max(1, math.ceil(wait)))})
                return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body = await _read_body(receive, limit)
            if body is None:
                await self._refuse(send, 413, "too_large", f"request body larger than {limit} bytes",
                                   type="invalid_request_error", code="request_too_large")
                return
            if isinstance(body, dict):  # the client left while sending
                self.metrics.disconnects.labels("body").inc()
                return
        else:
            await self.app(scope, receive, send)
            return
        if not limited:
            await self.app(scope, _replaying(body, receive), send)
            return
        await self._limited(scope, body, receive, send)

    async def _limited(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        """Queue for a slot and run the route; a client disconnect (read from `receive` by a watcher task) cancels
        the queue wait or the route's work at once: upstream calls close, local generation stops."""
        gone = anyio.Event()
        finished = {"response": False}

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finished["response"] = True
            await send(message)

        replay = [{"type": "http.request", "body": body, "more_body": False}]

        async def app_receive() -> Message:
            if replay:
                return replay.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async with anyio.create_task_group() as tg:
            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()
                if not finished["response"]:
                    self.metrics.disconnects.labels("client").inc()
                    tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                await self._run_in_slot(scope, app_receive, tracking_send)
            finally:
                tg.cancel_scope.cancel()

    async def _run_in_slot(self, scope: Scope, receive: Receive, send: Send) -> None:
        cfg = self.config
        refused = await self.slots.acquire(cfg.queue_timeout_s)
        if refused is not None:
            why = {"queue_full": f"{self.slots.queued} requests already waiting (queue_depth={cfg.queue_depth})",
                   "overloaded": f"the {self.slots.queued} requests waiting would take longer than "
                                 f"queue_timeout_s={cfg.queue_timeout_s:g} to serve",
                   }.get(refused, f"no slot freed within queue_timeout_s={cfg.queue_timeout_s:g}")
            await self._refuse(send, 429, "busy", f"server busy: {self.slots.in_flight} requests in flight "
                               f"(max_concurrency={cfg.max_concurrency}), {why}; retry shortly",
                               type="rate_limit_error", code="server_busy",
                               headers={"retry-after": str(self.slots.retry_after_s())})
            return
        self.metrics.in_flight.inc()
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.slots.release(time.perf_counter() - started)
            self.metrics.in_flight.dec()


async def _read_body(receive: Receive, limit: int) -> bytes | dict[str, Any] | None:
    """The whole body (at most `limit` bytes); None when too large, the disconnect message when the client left.
    Bodies without content-length are caught here too, before any route parses them."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return dict(message)
        body = message.get("body", b"")
        size += len(body)
        if size > limit:
            return None
        chunks.append(body)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    replay: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replaying() -> Any:
        return replay.pop() if replay else await receive()

    return replaying
