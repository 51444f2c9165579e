"""One ASGI middleware in front of every route: metrics, API-key auth, body size limit, bounded concurrency.

It is a plain ASGI middleware (not `BaseHTTPMiddleware`) so that streamed responses pass through untouched and a
concurrency slot stays held until the last byte of a stream is sent.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ragzip.server.config import ServerConfig
from ragzip.server.errors import error_body
from ragzip.server.metrics import Metrics

# Routes that do work: they count against the concurrency limit and need a key when keys are configured.
LIMITED = frozenset({"/v1/chat/completions", "/v1/compress", "/v1/documents"})
OPEN = frozenset({"/healthz", "/metrics", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"})
KNOWN = LIMITED | OPEN | {"/v1/models"}


async def _send_error(send: Send, status: int, message: str, *, type: str, code: str,
                      headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(message, type=type, code=code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Slots:
    """The count of requests in flight (shared by the guard and /healthz)."""

    def __init__(self) -> None:
        self.in_flight = 0


class Guard:
    """Counts in-flight work and refuses (429) above `max_concurrency`; checks keys; caps body bytes."""

    def __init__(self, app: ASGIApp, *, config: ServerConfig, metrics: Metrics, slots: Slots) -> None:
        self.app = app
        self.config = config
        self.metrics = metrics
        self.keys = [k.encode() for k in config.api_keys]
        self.slots = slots

    def _authorized(self, scope: Scope) -> bool:
        if not self.keys:
            return True
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        return any(hmac.compare_digest(given, k) for k in self.keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in KNOWN else "other"
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

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        if path not in OPEN and not self._authorized(scope):
            self.metrics.rejected.labels("auth").inc()
            await _send_error(send, 401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                              type="invalid_request_error", code="invalid_api_key",
                              headers={"www-authenticate": "Bearer"})
            return
        limit = self.config.max_body_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            self.metrics.rejected.labels("too_large").inc()
            await _send_error(send, 413, f"request body larger than {limit} bytes", type="invalid_request_error",
                              code="request_too_large")
            return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            buffered = await _buffered(receive, limit)
            if buffered is None:
                self.metrics.rejected.labels("too_large").inc()
                await _send_error(send, 413, f"request body larger than {limit} bytes",
                                  type="invalid_request_error", code="request_too_large")
                return
            receive = buffered
        if path not in LIMITED or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        if self.slots.in_flight >= self.config.max_concurrency:
            self.metrics.rejected.labels("busy").inc()
            await _send_error(send, 429, f"server busy: {self.slots.in_flight} requests in flight "
                                         f"(max_concurrency={self.config.max_concurrency}); retry shortly",
                              type="rate_limit_error", code="server_busy", headers={"retry-after": "1"})
            return
        self.slots.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.slots.in_flight -= 1
            self.metrics.in_flight.dec()


async def _buffered(receive: Receive, limit: int) -> Receive | None:
    """Read the whole body (at most `limit` bytes) and return a receive that replays it; None when too large.
    Bodies without content-length are caught here too, before any route parses them."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            chunks = []
            break
        body = message.get("body", b"")
        size += len(body)
        if size > limit:
            return None
        chunks.append(body)
        if not message.get("more_body", False):
            break
    replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def replaying() -> Any:
        return replay.pop() if replay else await receive()

    return replaying
