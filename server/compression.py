"""Compression for the proxy: method/budget resolution, a small cache of built pipelines, worker threads, and
the fallback to the uncompressed context when a compressor fails."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anyio

from ragzip.budget import Budget
from ragzip.compressors.base import CompressionRequest, compress_many
from ragzip.compressors.registry import COMPRESSORS, canonical_method
from ragzip.errors import ConfigError, ModelNotFoundError, RagzipError, UnsupportedModelError
from ragzip.server.batching import MicroBatcher
from ragzip.server.config import KeyPolicy, OverloadPolicy, ServerConfig
from ragzip.server.errors import APIError, redacted
from ragzip.server.metrics import Metrics
from ragzip.server.result_cache import ResultCache, cache_key, weights_revision
from ragzip.server.schemas import RagzipOptions
from ragzip.spans import assemble
from ragzip.tokens import TokenCounter, get_token_counter
from ragzip.types import CompressionResult, Document

log = logging.getLogger("ragzip.server")
_MAX_PIPELINES = 16
# Options that load models, name files or URLs or pick hardware: the server's config decides them, never a request
# ("scorer": EXIT's causal-lm judge loads an LLM). tests/test_promises.py holds every option to this list or the
# per-request one.
SERVER_ONLY_OPTIONS = frozenset({"device", "model", "weights", "adapter", "embedder", "llm", "cache_dir", "api_key",
                                 "dtype", "scorer"})


@dataclass(frozen=True, slots=True)
class Plan:
    """What to run for one request."""

    method: str
    budget: Budget
    options: dict[str, Any]
    on_overload: OverloadPolicy = "queue"
    compress: bool = True  # False: the key opted out; the context goes uncompressed


FallbackReason = Literal["error", "overload", "timeout"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a request's context became: the contract's `compressed` object, where it came from ("compressor",
    "cache", or "none" when nothing was compressed), and, when the context went uncompressed because of the
    compressor, why (`fallback_reason`) in words (`fallback`)."""

    compressed: dict[str, Any]
    source: str = "compressor"
    fallback: str | None = None
    fallback_reason: FallbackReason | None = None

    @property
    def documents(self) -> list[Document]:
        """The kept context as Documents (empty pieces dropped): what the LLM is given."""
        return [Document(c["id"], c["text"], c.get("title") or "") for c in self.compressed["contexts"]
                if c["text"].strip()]


def check_size(config: ServerConfig, documents: Sequence[Document], *, param: str) -> None:
    """Refuse (400) a document longer than `max_document_chars` or documents longer than `max_context_chars` in
    all: compression time and memory grow with the text, so the bound is set before any work."""
    total = 0
    for i, doc in enumerate(documents):
        n = len(doc.text)
        if n > config.max_document_chars:
            raise APIError(400, f"document {i} has {n} characters; this server accepts at most "
                                f"{config.max_document_chars} per document", code="document_too_large", param=param)
        total += n
    if total > config.max_context_chars:
        raise APIError(400, f"the documents have {total} characters in all; this server accepts at most "
                            f"{config.max_context_chars} per request", code="context_too_large", param=param)


class CompressionService:
    """Builds pipelines once per (method, options) and runs them in worker threads, one batch at a time per
    pipeline (tokenizers and embedders are not safe to share between threads): requests that arrive together are
    compressed together (`MicroBatcher`, `compress_many`), each getting its own result or error (in bf16 the
    batch's shape can move a borderline unit: docs/speed.md)."""

    def __init__(self, config: ServerConfig, metrics: Metrics, *, tokenizer: str | None = None,
                 device: str | None = None, cache: ResultCache | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.device = device
        self.registered = set(COMPRESSORS)
        self._counter: TokenCounter | None = None
        self._pipelines: OrderedDict[str, tuple[Any, MicroBatcher[CompressionRequest, CompressionResult]]] = \
            OrderedDict()
        self._lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self._run_lock = threading.Lock()  # one compression batch at a time across pipelines (shared encoders)
        self._pending_lock = threading.Lock()
        self._pending = 0  # compressions submitted and not yet finished (queued in a batcher or running)
        self._per_request_s = 0.1  # moving average of a batch's seconds per request: the overload estimate
        self.cache = cache if cache is not None else ResultCache(0, metrics)
        # "ok", "loading" while `warm` runs, or why the default compressor failed to load.
        self.readiness = "ok"

    def warm(self) -> None:
        """Build the default pipeline and run it once on a tiny input, so its models are loaded before the first
        request (the readiness probe says "loading" until then). Never raises: `readiness` keeps the reason."""
        self.readiness = "loading"
        try:
            weights_revision()  # hashed once here, not on the event loop by the first request
            plan = self.plan(None)
            self._run(plan, "Where is the tower?", [Document("warm-up", "The tower is in Paris. It is tall.")])
        except Exception as exc:  # noqa: BLE001 - reported by /readyz; requests still fall back to uncompressed
            log.warning("the default compressor %r failed to load: %s", self.config.method, redacted(exc))
            self.readiness = f"failed: {type(exc).__name__} (see the server log)"  # /readyz is public: no message
            return
        self.readiness = "ok"

    @property
    def counter(self) -> TokenCounter:
        with self._counter_lock:  # once, whichever of the warm-up thread and the first request comes first
            if self._counter is None:
                self._counter = get_token_counter(self.tokenizer)
            return self._counter

    def plan(self, opts: RagzipOptions | None, key: KeyPolicy | None = None) -> Plan:
        """Resolve the request's `ragzip` object against its API key's defaults (`keys`), then the server's.

        Raises:
            APIError: 400 for a method that is not registered or not allowed, or options the server refuses.
        """
        opts = opts or RagzipOptions()
        key = key or KeyPolicy()
        default_method = key.method or self.config.method
        method = canonical_method(opts.method) if opts.method is not None else default_method
        if opts.method is not None:
            # With allowed_methods, a request names one of them exactly: allowing "exit" and "lingua2" does not
            # allow their pipeline (which costs both); list "exit+lingua2" to allow it.
            allowed = set(self.config.allowed_methods) if self.config.allowed_methods is not None else None
            unknown = [n for n in method.split("+") if n not in self.registered]
            if unknown or method.endswith(".json") or (allowed is not None and method not in allowed):
                valid = sorted(allowed) if allowed is not None else sorted(self.registered)
                raise APIError(400, f"method {opts.method!r} is not available; valid: {valid}"
                                    f"{'' if allowed is not None else ', or a +-joined pipeline of them'}",
                               code="invalid_method", param="ragzip.method")
        options: dict[str, Any] = {}
        if key.options is not None and method == default_method:
            options = dict(key.options)
        elif method == self.config.method:
            options = dict(self.config.options)
        if opts.options:
            if not self.config.allow_request_options:
                raise APIError(400, "this server does not accept per-request compressor options",
                               code="options_not_allowed", param="ragzip.options")
            nested = [k for v in opts.options.values() if isinstance(v, dict) for k in v]
            refused = sorted(SERVER_ONLY_OPTIONS & {*opts.options, *nested})
            if refused:
                raise APIError(400, f"options {refused} are set in the server's config, not per request",
                               code="options_not_allowed", param="ragzip.options")
            options.update(opts.options)
        if any(x is not None for x in (opts.rate, opts.target_tokens, opts.threshold, opts.coverage)):
            budget = Budget(rate=opts.rate, target_tokens=opts.target_tokens, threshold=opts.threshold,
                            coverage=opts.coverage)
        elif key.rate is not None or key.target_tokens is not None:
            budget = Budget(rate=key.rate, target_tokens=key.target_tokens)
        else:
            budget = Budget(rate=self.config.rate, target_tokens=self.config.target_tokens)
        policy = key.on_overload or self.config.on_overload
        if opts.on_overload is not None and opts.on_overload != policy:
            if opts.on_overload == "queue" and not self.config.allow_request_options:
                # queueing costs the compressor what the operator chose to shed: only the operator may allow it
                raise APIError(400, f"on_overload 'queue' is not allowed here: this server's policy for the "
                                    f"request is {policy!r}", code="options_not_allowed", param="ragzip.on_overload")
            policy = opts.on_overload
        return Plan(method, budget, options, policy, key.compress)

    def pipeline(self, plan: Plan) -> Any:
        """The built pipeline for `plan` (ConfigError for options the compressor rejects)."""
        return self._entry(plan)[0]

    def _entry(self, plan: Plan) -> tuple[Any, MicroBatcher[CompressionRequest, CompressionResult]]:
        from ragzip.pipeline import build_compressor

        key = plan.method + "\x00" + json.dumps(plan.options, sort_keys=True, default=str)
        with self._lock:
            if key in self._pipelines:
                self._pipelines.move_to_end(key)
                self.metrics.cache_hits.labels("pipeline").inc()
                return self._pipelines[key]
            self.metrics.cache_misses.labels("pipeline").inc()
            try:
                built = build_compressor(plan.method, counter=self.counter, options=plan.options, device=self.device)
            except (TypeError, ValueError) as exc:  # option values the compressor cannot parse
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(f"invalid options for {plan.method!r}: {type(exc).__name__}: {exc}") from None
            batcher: MicroBatcher[CompressionRequest, CompressionResult] = MicroBatcher(
                lambda requests, pipe=built: self._run_many(pipe, requests),
                window_s=self.config.batch_window_ms / 1000.0, max_batch=self.config.max_batch)
            self._pipelines[key] = (built, batcher)
            while len(self._pipelines) > _MAX_PIPELINES:
                self._pipelines.popitem(last=False)
            return built, batcher

    def _run_many(self, pipe: Any, requests: list[CompressionRequest]) -> list[Any]:
        self.metrics.compress_batch_size.observe(len(requests))
        with self._run_lock:
            started = time.perf_counter()
            results = compress_many(pipe, requests, return_exceptions=True)
            self._per_request_s = 0.8 * self._per_request_s + 0.2 * (time.perf_counter() - started) / len(requests)
            return results

    def _run(self, plan: Plan, query: str, documents: Sequence[Document]) -> CompressionResult:
        _, batcher = self._entry(plan)
        with self._pending_lock:
            self._pending += 1
        try:
            return batcher.submit(CompressionRequest(query, list(documents), plan.budget))
        finally:
            with self._pending_lock:
                self._pending -= 1

    def expected_wait_s(self) -> float:
        """How long a compression asked for now would wait for the ones ahead of it (pending x the recent time per
        request, batching included)."""
        return self._pending * self._per_request_s

    def _uncompressed(self, documents: Sequence[Document], started: float) -> CompressionResult:
        try:
            counts = self.counter.count_batch([d.text for d in documents])
        except (RagzipError, OSError, RuntimeError, ValueError):
            counts = [len(d.text.split()) for d in documents]
        total = sum(counts)
        docs = tuple(assemble(d, [(0, len(d.text))]) for d in documents if d.text)
        return CompressionResult("none", docs, total, total, time.perf_counter() - started)

    async def uncompressed(self, documents: Sequence[Document], *, fallback: str | None = None,
                           reason: FallbackReason | None = None) -> Outcome:
        """The documents as they are (method "none"), counted."""
        result = await anyio.to_thread.run_sync(self._uncompressed, documents, time.perf_counter())
        return Outcome(result.to_contract(), "none", fallback, reason)

    def _key(self, plan: Plan, query: str, documents: Sequence[Document]) -> str:
        return cache_key(documents=documents, question=query, method=plan.method, budget=plan.budget.as_dict(),
                         tokenizer=self.counter.name, options=plan.options, revision=weights_revision())

    async def _cache_key(self, plan: Plan, query: str, documents: Sequence[Document]) -> str | None:
        """The result cache's key (None when the cache is off); computed in a thread until the budget tokenizer
        is loaded, so that a worker's first requests do not hold its event loop while it loads."""
        if not self.cache.enabled:
            return None
        try:
            if self._counter is None:
                return await anyio.to_thread.run_sync(self._key, plan, query, documents)
            return self._key(plan, query, documents)
        except Exception as exc:  # noqa: BLE001 - e.g. the budget tokenizer cannot load: no cache, and the
            log.warning("result cache off for this request: %s", redacted(exc))  # compression path reports it
            return None

    def _admit(self, plan: Plan, *, fail_open: bool) -> bool:
        """True when the compression may run; False when the request goes uncompressed (overloaded under
        `uncompressed`). Raises the 429 of `reject` (or of `uncompressed` where there is nothing to forward)."""
        policy = plan.on_overload
        wait = self.expected_wait_s()
        budget_s = self.config.compress_wait_ms / 1000.0
        if self.config.compress_timeout_ms is not None:  # a wait past the timeout would only time out
            budget_s = min(budget_s, self.config.compress_timeout_ms / 1000.0)
        if wait <= budget_s or policy == "queue":
            if wait > budget_s:
                self.metrics.overload.labels("queue").inc()
            return True
        if policy == "uncompressed" and fail_open:
            self.metrics.overload.labels("uncompressed").inc()
            return False
        self.metrics.overload.labels("reject").inc()
        raise APIError(429, f"the compressor is busy: about {wait:.1f} s of compression is queued (more than "
                            f"compress_wait_ms={self.config.compress_wait_ms:g}); retry shortly",
                       type="rate_limit_error", code="compressor_busy",
                       headers={"retry-after": str(max(1, min(60, math.ceil(wait))))})

    async def _compress(self, plan: Plan, query: str, documents: Sequence[Document]) -> CompressionResult:
        """Run the compressor in a worker thread, at most `compress_timeout_ms` (TimeoutError after it: the thread
        finishes its batch in the background, since a running forward cannot be interrupted)."""
        timeout_ms = self.config.compress_timeout_ms
        with anyio.fail_after(None if timeout_ms is None else timeout_ms / 1000.0):
            return await anyio.to_thread.run_sync(self._run, plan, query, documents, abandon_on_cancel=True)

    async def compress(self, plan: Plan, query: str, documents: Sequence[Document]) -> Outcome:
        """Compress or raise (the /v1/compress contract): a failure is a clear 500, bad options a 400, an
        overloaded compressor a 429 unless the plan's on_overload is queue, a timeout a 504."""
        if not plan.compress:
            return await self.uncompressed(documents)
        key = await self._cache_key(plan, query, documents)
        if key is not None and (hit := await self.cache.get(key)) is not None:
            return Outcome(hit, "cache")
        self._admit(plan, fail_open=False)
        try:
            result = await self._compress(plan, query, documents)
        except TimeoutError:
            self.metrics.compress_timeouts.inc()
            raise APIError(504, f"compression with {plan.method!r} took longer than compress_timeout_ms="
                                f"{self.config.compress_timeout_ms:g}", type="server_error",
                           code="compression_timeout") from None
        except (ModelNotFoundError, UnsupportedModelError) as exc:  # the server's own models: its fault, not the
            log.error("compressor %r cannot load: %s", plan.method, redacted(exc))  # request's (it names none)
            raise APIError(500, f"compression with {plan.method!r} is unavailable on this server: {exc}",
                           type="server_error", code="compressor_unavailable") from exc
        except RagzipError:
            raise
        except Exception as exc:  # a compressor bug must not look like a server crash without a message
            log.error("compression with %r failed: %s", plan.method, redacted(exc))
            raise APIError(500, f"compression with {plan.method!r} failed: {type(exc).__name__}: {exc}",
                           type="server_error", code="compression_failed") from exc
        return await self._finish(key, result)

    async def _finish(self, key: str | None, result: CompressionResult) -> Outcome:
        self.metrics.record_compression(result.method, result.tokens_before, result.tokens_after, result.seconds)
        compressed = result.to_contract()
        if key is not None:
            await self.cache.put(key, compressed)
        return Outcome(compressed)

    async def compress_or_fallback(self, plan: Plan, query: str, documents: Sequence[Document]) -> Outcome:
        """Compress for a chat request; when the compressor fails, times out, or (policy `uncompressed`) is
        overloaded, return the uncompressed context and the reason. Invalid methods or options still raise (they
        are the caller's mistake), and so does `reject`'s 429."""
        if not documents:
            return Outcome(CompressionResult(plan.method, (), 0, 0, 0.0).to_contract(), "none")
        if not plan.compress:
            return await self.uncompressed(documents)
        key = await self._cache_key(plan, query, documents)
        if key is not None and (hit := await self.cache.get(key)) is not None:
            return Outcome(hit, "cache")
        try:
            await anyio.to_thread.run_sync(self.pipeline, plan)  # bad options (ConfigError) are a 400 ...
            if not self._admit(plan, fail_open=True):
                return await self.uncompressed(documents, reason="overload", fallback=(
                    f"overload: about {self.expected_wait_s():.1f} s of compression queued (compress_wait_ms="
                    f"{self.config.compress_wait_ms:g})"))
            result = await self._compress(plan, query, documents)
        except TimeoutError:
            self.metrics.compress_timeouts.inc()
            self.metrics.fallbacks.labels(plan.method).inc()
            return await self.uncompressed(documents, reason="timeout", fallback=(
                f"timeout: compression took longer than compress_timeout_ms={self.config.compress_timeout_ms:g}"))
        except (ModelNotFoundError, UnsupportedModelError) as exc:  # ... the server's own missing models are not
            log.warning("compressor %r cannot load, serving the uncompressed context: %s", plan.method, redacted(exc))
            self.metrics.fallbacks.labels(plan.method).inc()
            return await self.uncompressed(documents, reason="error", fallback=(
                f"{type(exc).__name__}: the compressor's models are unavailable on this server"))
        except (ConfigError, APIError):  # bad options; reject's 429
            raise
        except Exception as exc:  # any compressor failure: serve the full context instead, and say so
            log.warning("compressor %r failed, serving the uncompressed context: %s", plan.method, redacted(exc))
            self.metrics.fallbacks.labels(plan.method).inc()
            return await self.uncompressed(documents, reason="error", fallback=f"{type(exc).__name__}: {exc}"[:500])
        return await self._finish(key, result)
