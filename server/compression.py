"""Compression for the proxy: method/budget resolution, a small cache of built pipelines, worker threads, and
the fallback to the uncompressed context when a compressor fails."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from ragzip.budget import Budget
from ragzip.compressors.base import CompressionRequest, compress_many
from ragzip.compressors.registry import COMPRESSORS, canonical_method
from ragzip.errors import ConfigError, ModelNotFoundError, RagzipError, UnsupportedModelError
from ragzip.server.batching import MicroBatcher
from ragzip.server.config import ServerConfig
from ragzip.server.errors import APIError, redacted
from ragzip.server.metrics import Metrics
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


@dataclass(frozen=True, slots=True)
class Outcome:
    result: CompressionResult
    fallback: str | None = None


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
                 device: str | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.device = device
        self.registered = set(COMPRESSORS)
        self._counter: TokenCounter | None = None
        self._pipelines: OrderedDict[str, tuple[Any, MicroBatcher[CompressionRequest, CompressionResult]]] = \
            OrderedDict()
        self._lock = threading.Lock()
        self._run_lock = threading.Lock()  # one compression batch at a time across pipelines (shared encoders)
        # "ok", "loading" while `warm` runs, or why the default compressor failed to load.
        self.readiness = "ok"

    def warm(self) -> None:
        """Build the default pipeline and run it once on a tiny input, so its models are loaded before the first
        request (the readiness probe says "loading" until then). Never raises: `readiness` keeps the reason."""
        self.readiness = "loading"
        try:
            plan = self.plan(None)
            self._run(plan, "Where is the tower?", [Document("warm-up", "The tower is in Paris. It is tall.")])
        except Exception as exc:  # noqa: BLE001 - reported by /readyz; requests still fall back to uncompressed
            log.warning("the default compressor %r failed to load: %s", self.config.method, redacted(exc))
            self.readiness = f"failed: {type(exc).__name__} (see the server log)"  # /readyz is public: no message
            return
        self.readiness = "ok"

    @property
    def counter(self) -> TokenCounter:
        if self._counter is None:
            self._counter = get_token_counter(self.tokenizer)
        return self._counter

    def plan(self, opts: RagzipOptions | None) -> Plan:
        """Resolve the request's `ragzip` object against the server defaults.

        Raises:
            APIError: 400 for a method that is not registered or not allowed, or options the server refuses.
        """
        opts = opts or RagzipOptions()
        method = canonical_method(opts.method) if opts.method is not None else self.config.method
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
        options: dict[str, Any] = dict(self.config.options) if method == self.config.method else {}
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
        else:
            budget = Budget(rate=self.config.rate, target_tokens=self.config.target_tokens)
        return Plan(method, budget, options)

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
            return compress_many(pipe, requests, return_exceptions=True)

    def _run(self, plan: Plan, query: str, documents: Sequence[Document]) -> CompressionResult:
        _, batcher = self._entry(plan)
        return batcher.submit(CompressionRequest(query, list(documents), plan.budget))

    def _uncompressed(self, documents: Sequence[Document], started: float) -> CompressionResult:
        try:
            counts = self.counter.count_batch([d.text for d in documents])
        except (RagzipError, OSError, RuntimeError, ValueError):
            counts = [len(d.text.split()) for d in documents]
        total = sum(counts)
        docs = tuple(assemble(d, [(0, len(d.text))]) for d in documents if d.text)
        return CompressionResult("none", docs, total, total, time.perf_counter() - started)

    async def uncompressed(self, documents: Sequence[Document]) -> CompressionResult:
        """The documents as they are (method "none"), counted."""
        return await anyio.to_thread.run_sync(self._uncompressed, documents, time.perf_counter())

    async def compress(self, plan: Plan, query: str, documents: Sequence[Document]) -> CompressionResult:
        """Compress or raise (the /v1/compress contract): a failure is a clear 500, bad options a 400."""
        try:
            result = await anyio.to_thread.run_sync(self._run, plan, query, documents)
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
        self.metrics.record_compression(result.method, result.tokens_before, result.tokens_after, result.seconds)
        return result

    async def compress_or_fallback(self, plan: Plan, query: str, documents: Sequence[Document]) -> Outcome:
        """Compress for a chat request; when the compressor fails at run time, return the uncompressed context
        and the reason. Invalid methods or options still raise (they are the caller's mistake)."""
        started = time.perf_counter()
        if not documents:
            return Outcome(CompressionResult(plan.method, (), 0, 0, 0.0))
        try:
            await anyio.to_thread.run_sync(self.pipeline, plan)  # bad options (ConfigError) are a 400 ...
            result = await anyio.to_thread.run_sync(self._run, plan, query, documents)
        except (ModelNotFoundError, UnsupportedModelError) as exc:  # ... the server's own missing models are not
            log.warning("compressor %r cannot load, serving the uncompressed context: %s", plan.method, redacted(exc))
            self.metrics.fallbacks.labels(plan.method).inc()
            result = await anyio.to_thread.run_sync(self._uncompressed, documents, started)
            return Outcome(result, f"{type(exc).__name__}: the compressor's models are unavailable on this server")
        except ConfigError:
            raise
        except Exception as exc:  # any compressor failure: serve the full context instead, and say so
            log.warning("compressor %r failed, serving the uncompressed context: %s", plan.method, redacted(exc))
            self.metrics.fallbacks.labels(plan.method).inc()
            result = await anyio.to_thread.run_sync(self._uncompressed, documents, started)
            return Outcome(result, f"{type(exc).__name__}: {exc}"[:500])
        self.metrics.record_compression(result.method, result.tokens_before, result.tokens_after, result.seconds)
        return Outcome(result)
