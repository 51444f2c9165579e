"""State that the proxy's worker processes and replicas share through Redis (`"shared": "redis://..."`): rate-limit
buckets, the compression result cache and the index's id counter and document log.

Redis is a help, never a dependency of a request: every call has a short timeout, a failure is counted
(`ragzip_shared_errors_total{op}`) and answered locally (local rate limits, the worker's own cache), and after a
failure Redis is left alone for `retry_s` so that an outage costs one timeout, not one per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as redis_asyncio

from ragzip.server.metrics import Metrics

log = logging.getLogger("ragzip.server")
T = TypeVar("T")
PREFIX = "ragzip:"
# Which kind of shared state an operation serves: a failure pauses Redis for that kind only.
_GROUP = {"rate_limit": "limit", "cache_get": "cache", "cache_put": "cache", "cache_delete": "cache",
          "ids": "index", "log_append": "index", "log_read": "index", "generation": "index"}

# A token bucket per client, atomic in Redis; the clock is Redis's own (workers' clocks may differ). Returns the
# seconds until the request could go ("0" when it may go now), as a string: Lua numbers come back as integers.
_TOKEN_BUCKET = """
local rps = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local v = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(v[1]) or burst
local ts = tonumber(v[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rps)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rps end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rps * 1000) + 1000)
return tostring(wait)
"""


class SharedState:
    """One worker's connection to the shared Redis, failing soft (see the module doc).

    Args:
        url: redis://host:port/db (rediss:// and unix:// too).
        metrics: where errors and the up/down state are counted.
        timeout_s: connect and read timeout of one call.
        retry_s: how long Redis is skipped after a failure.
    """

    def __init__(self, url: str, metrics: Metrics, *, timeout_s: float = 0.25, retry_s: float = 2.0) -> None:
        self.url = url
        self.metrics = metrics
        self.retry_s = retry_s
        self.client = redis_asyncio.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._bucket = self.client.register_script(_TOKEN_BUCKET)
        self._down_until: dict[str, float] = {}  # per kind of state
        metrics.shared_up.set(1)

    def down(self, group: str) -> bool:
        """Whether `group`'s state is answered locally now (after a recent failure)."""
        return time.monotonic() < self._down_until.get(group, 0.0)

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T | None:
        """`fn()`'s result, or None when Redis failed now or recently for this kind of state (counted)."""
        group = _GROUP[op]
        if self.down(group):
            self.metrics.shared_fallbacks.labels(op).inc()
            return None
        try:
            result = await fn()
        except Exception as exc:  # noqa: BLE001 - any Redis or connection failure: answer locally
            self.metrics.shared_errors.labels(op).inc()
            self.metrics.shared_fallbacks.labels(op).inc()
            self.metrics.shared_up.set(0)
            log.warning("shared state %s failed (%s); this worker uses its own %s state for %.0f s", op,
                        type(exc).__name__, group, self.retry_s)
            self._down_until[group] = time.monotonic() + self.retry_s
            return None
        if not any(self.down(g) for g in self._down_until):
            self.metrics.shared_up.set(1)
        return result

    async def ping(self) -> str | None:
        """None when Redis answers, else why not (for startup checks and /readyz)."""
        try:
            await self.client.ping()
        except Exception as exc:  # noqa: BLE001
            return f"{type(exc).__name__}: {exc}"
        return None

    async def rate_wait(self, client: str, rps: float, burst: int) -> float | None:
        """Seconds until `client` may send (0: now) by the shared bucket; None when Redis is unavailable."""
        raw = await self._call("rate_limit", lambda: self._bucket(keys=[f"{PREFIX}rl:{client}"], args=[rps, burst]))
        return None if raw is None else float(raw)

    async def get(self, key: str, max_bytes: int) -> bytes | None:
        """The value at `key`, read at most `max_bytes` + 1 long (a longer value comes back over the limit)."""
        value = await self._call("cache_get", lambda: self.client.getrange(PREFIX + key, 0, max_bytes))
        return value if isinstance(value, bytes) and value else None

    async def get_text(self, name: str) -> str | None:
        """A small string value (None when missing or Redis is down: see `down`)."""
        value = await self._call("generation", lambda: self.client.getrange(f"{PREFIX}{name}", 0, 63))
        return value.decode("ascii", "replace") if isinstance(value, bytes) and value else None

    async def next_generation(self, name: str, old: str, ttl_s: float) -> int | None:
        """Advance the counter `name` and let the list `old` expire after `ttl_s`; the new value, None when down."""
        async def advance() -> int:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.incr(f"{PREFIX}{name}")
                pipe.expire(f"{PREFIX}{old}", max(1, int(ttl_s)))
                new, _ = await pipe.execute()
            return int(new)

        return await self._call("generation", advance)

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._call("cache_put", lambda: self.client.set(PREFIX + key, value, px=max(1, int(ttl_s * 1000))))

    async def delete(self, key: str) -> None:
        await self._call("cache_delete", lambda: self.client.delete(PREFIX + key))

    async def reserve_ids(self, name: str, n: int) -> int | None:
        """The first of `n` consecutive numbers of the counter `name`, unique across workers; None when down."""
        end = await self._call("ids", lambda: self.client.incrby(f"{PREFIX}{name}", n))
        return None if end is None else int(end) - n

    async def append(self, name: str, items: list[bytes]) -> int | None:
        """Append to the list `name`; its new length, or None when down."""
        n = await self._call("log_append", lambda: self.client.rpush(f"{PREFIX}{name}", *items))
        return None if n is None else int(n)

    async def read(self, name: str, start: int, limit: int) -> list[bytes] | None:
        """Up to `limit` items of the list `name` from `start`; None when down."""
        items = await self._call("log_read", lambda: self.client.lrange(f"{PREFIX}{name}", start, start + limit - 1))
        return None if items is None else list(items)

    async def aclose(self) -> None:
        await self.client.aclose()


def describe_unshared(workers: int, shared: Any) -> str | None:
    """What N workers without shared state do not share (a startup warning), or None."""
    if workers <= 1 or shared:
        return None
    return (f"{workers} workers without 'shared' (Redis): each worker keeps its own rate-limit buckets (a key may "
            f"send {workers}x its limit), its own result cache and its own document index (documents added through "
            "one worker are not searched by the others)")
