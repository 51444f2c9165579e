"""The FastAPI app: OpenAI-compatible chat completions with context compression, /v1/compress, index, health,
metrics. `create_app(config)` builds it; `serve(...)` runs it with uvicorn (what `ragzip serve` calls).

Example:
    >>> from ragzip.server.app import create_app
    >>> from ragzip.server.config import ServerConfig
    >>> app = create_app(ServerConfig(upstream="http://127.0.0.1:8001/v1", method="embed-topk"))
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import redis
import uvicorn
from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from ragzip.contract import check_strings, parse_record, to_documents
from ragzip.errors import ConfigError
from ragzip.prompt import PromptBuilder
from ragzip.registry import load_tokenizer
from ragzip.server import errors
from ragzip.server.chat import chat_completion
from ragzip.server.compression import CompressionService, check_size
from ragzip.server.config import KeyPolicy, ServerConfig, load_config
from ragzip.server.guard import Guard, Slots
from ragzip.server.index import IndexService
from ragzip.server.metrics import Metrics
from ragzip.server.result_cache import ResultCache
from ragzip.server.schemas import (
    AddDocumentsRequest,
    AddDocumentsResponse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ClearedIndex,
    CompressRequest,
    CompressResponse,
    DocumentList,
    ErrorResponse,
    Health,
    IndexedChunk,
    IndexedDocument,
    ListedDocument,
    Readiness,
    plain_documents,
)
from ragzip.server.shared import SharedState, describe_unshared
from ragzip.settings import Settings

log = logging.getLogger("ragzip.server")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 429, 500, 502, 504)
}

_STREAM: dict[int | str, dict[str, Any]] = {
    200: {"description": "A chat.completion object, or with `stream: true` server-sent `chat.completion.chunk` "
                         "events ending with `data: [DONE]`",
          "content": {"text/event-stream": {"schema": {
              "type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}},
}


@dataclass(slots=True)
class ServerState:
    """What the routes share; built once per app."""

    config: ServerConfig
    settings: Settings
    metrics: Metrics
    compression: CompressionService
    index: IndexService
    upstream: Any = None
    prompt_builder: PromptBuilder | None = None  # upstream_kind vllm: lays out the prompt sent as token ids
    backend: Any = None
    slots: Slots | None = None
    shared: SharedState | None = None
    readiness: tuple[float, dict[str, str]] | None = None  # (when, checks): probes are cached for a second


def load_engine(config: ServerConfig, settings: Settings) -> Any:
    """The local engine the config names (ModelNotFoundError / ConfigError when it cannot load)."""
    from ragzip.engine import LocalEngine

    if settings.num_threads:
        import torch

        torch.set_num_threads(settings.num_threads)
    return LocalEngine(config.llm or settings.llm, dtype=config.dtype or settings.dtype,
                       device=config.device or settings.device)


def open_kv_store(spec: str) -> Any:
    """The configured KV store, checked to answer (ConfigError otherwise: a server must not start on a store
    it cannot reach; once running, an outage only turns into counted misses)."""
    from ragzip.kvstore.stores.base import open_store

    try:
        store = open_store(spec)
    except ValueError as exc:  # e.g. a malformed redis URL
        raise ConfigError(f"kv_store {spec!r}: {exc}") from None
    problem = store.reachable()
    if problem is not None:
        raise ConfigError(f"kv_store {spec!r} does not answer: {problem}")
    return store


def _load_backend(config: ServerConfig, settings: Settings, engine: Any, store: Any, metrics: Metrics) -> Any:
    from ragzip.server.local import LocalBackend

    engine = engine if engine is not None else load_engine(config, settings)
    kv_engine = None
    if config.kv_store:
        from ragzip.kernels.blend import BlendConfig
        from ragzip.kv_engine import KVReuseEngine

        store = store if store is not None else open_kv_store(config.kv_store)
        blend = None if config.kv_ratio is None else BlendConfig(recompute_ratio=config.kv_ratio)
        kv_engine = KVReuseEngine(engine.model, engine.tokenizer, store=store, mode=config.kv_mode, blend=blend,
                                  qualification_dir=settings.cache_dir)
        if config.kv_mode == "auto":
            kv_engine.qualification  # calibrated here (once per model, then cached), not on the first request
    return LocalBackend(engine, kv_engine=kv_engine, model_name=config.model_name,
                        aliases=(config.llm or settings.llm,), metrics=metrics)


def _key_policy(request: Request) -> KeyPolicy | None:
    """The policy the guard found for the request's API key (`keys`), if any."""
    return getattr(request.state, "ragzip_key", None)


async def _check_readiness(state: ServerState) -> dict[str, str]:
    """Each dependency a request needs: 'ok' or why not."""
    import anyio

    cached = state.readiness
    if cached is not None and time.monotonic() - cached[0] < 1.0:
        return cached[1]
    checks: dict[str, str] = {"compressor": state.compression.readiness}
    if state.shared is not None:  # reported, never fatal: workers answer from their own state meanwhile
        checks["shared"] = "ok" if await state.shared.ping() is None else "degraded (using local state)"
    if state.upstream is not None:
        checks["upstream"] = await state.upstream.ping(state.config.readiness_timeout_s) or "ok"
    else:
        checks["engine"] = "ok" if state.backend is not None else "not loaded"
        kv = getattr(state.backend, "kv_engine", None)
        if kv is not None and hasattr(kv.store, "reachable"):
            checks["kv_store"] = await anyio.to_thread.run_sync(kv.store.reachable) or "ok"
    state.readiness = (time.monotonic(), checks)
    return checks


def create_app(config: ServerConfig | None = None, *, settings: Settings | None = None, engine: Any = None,
               kv_store: Any = None) -> FastAPI:
    """Build the proxy.

    Args:
        config: server settings (default: `ServerConfig()`: local engine, method "exit", no auth).
        settings: process settings (default: read from `RAGZIP_*` environment variables once, here).
        engine: an already loaded `LocalEngine` to serve instead of loading one at startup (no upstream only).
        kv_store: an already opened store for `config.kv_store` (default: opened at startup).
    """
    config = config or ServerConfig()
    settings = settings or Settings()
    metrics = Metrics()
    tokenizer = config.tokenizer or settings.tokenizer
    device = config.device or settings.device
    cache = ResultCache(int(config.result_cache_mb * (1 << 20)), metrics, ttl_s=config.result_cache_ttl_s)
    state = ServerState(config, settings, metrics, CompressionService(config, metrics, tokenizer=tokenizer,
                                                                      device=device, cache=cache),
                        IndexService(config, tokenizer=tokenizer, device=device),
                        slots=Slots(config.max_concurrency, config.queue_depth))
    metrics.queued.set_function(lambda: state.slots.queued if state.slots else 0)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import anyio

        if config.shared:
            state.shared = SharedState(config.shared, metrics)
            state.compression.cache.shared = state.shared
            state.index.shared = state.shared
        if config.upstream:
            from ragzip.server.upstream import Upstream

            state.upstream = Upstream(config.upstream, api_key=config.upstream_api_key,
                                      timeout_s=config.upstream_timeout_s,
                                      connect_timeout_s=config.upstream_connect_timeout_s)
            if config.upstream_kind == "vllm":
                tokenizer = await anyio.to_thread.run_sync(load_tokenizer, config.upstream_tokenizer)
                state.prompt_builder = PromptBuilder(tokenizer)
        else:
            state.backend = await anyio.to_thread.run_sync(_load_backend, config, settings, engine, kv_store,
                                                             metrics)
        if config.warm_compressor:  # in the background: the server answers probes (not ready) meanwhile
            state.compression.readiness = "loading"
            threading.Thread(target=state.compression.warm, name="ragzip-warm", daemon=True).start()
        try:
            yield
        finally:
            if state.upstream is not None:
                await state.upstream.aclose()
            if state.shared is not None:
                await state.shared.aclose()

    from ragzip import __version__

    app = FastAPI(title="ragzip proxy", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible chat completions with RAG context compression.")
    app.state.ragzip = state
    errors.install(app)
    app.add_middleware(Guard, config=config, metrics=metrics, slots=state.slots,  # type: ignore[arg-type]
                       shared=lambda: state.shared)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**_ERRORS, **_STREAM},
              summary="Chat completion (OpenAI-compatible; `stream: true` answers with server-sent events)")
    async def chat(req: ChatCompletionRequest, request: Request,
                   authorization: Annotated[str | None, Header()] = None) -> Any:
        check_strings(req.model_dump(exclude_unset=True), "body")
        return await chat_completion(state, req, authorization, _key_policy(request))

    @app.post("/v1/compress", response_model=CompressResponse, responses=_ERRORS,
              summary="Compress one CLI-contract record; returns it with `compressed` added")
    async def compress(req: CompressRequest, request: Request) -> Any:
        if len(req.contexts) > config.max_documents:
            raise errors.APIError(400, f"{len(req.contexts)} contexts; this server accepts at most "
                                       f"{config.max_documents}", code="too_many_documents", param="contexts")
        record = req.model_dump(exclude_unset=True, exclude={"ragzip"})
        record["contexts"] = plain_documents(req.contexts)
        question, docs = parse_record(record)
        check_size(config, docs, param="contexts")
        plan = state.compression.plan(req.ragzip, _key_policy(request))
        outcome = await state.compression.compress(plan, question, docs)
        # The body is the CLI contract's record, byte for byte; where the result came from is a header.
        return JSONResponse({**record, "compressed": outcome.compressed},
                            headers={"x-ragzip-result-source": outcome.source})

    links = {"GetDocument": {"operationId": "get_document", "parameters": {"document_id": "$response.body#/ids/0"},
                             "description": "The first added document, as indexed"}}

    @app.post("/v1/documents", response_model=AddDocumentsResponse, responses={**_ERRORS, 200: {"links": links}},
              summary="Add documents to the proxy's own index")
    async def add_documents(req: AddDocumentsRequest) -> AddDocumentsResponse:
        if len(req.documents) > config.max_documents:
            raise errors.APIError(400, f"{len(req.documents)} documents; at most {config.max_documents} per call",
                                  code="too_many_documents", param="documents")
        docs = to_documents(plain_documents(req.documents),
                            default_ids=await state.index.next_ids(len(req.documents)))
        check_size(config, docs, param="documents")
        added = await state.index.add(docs)
        return AddDocumentsResponse(added_documents=len(docs), added_chunks=added, total_chunks=state.index.size,
                                    ids=[d.id for d in docs])

    @app.get("/v1/documents", response_model=DocumentList, responses=_ERRORS,
             summary="The documents of the proxy's index, a page at a time, in the order they were added")
    async def list_documents(offset: Annotated[int, Query(ge=0)] = 0,
                             limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> DocumentList:
        rows, total = await state.index.list(offset, limit)
        return DocumentList(data=[ListedDocument(id=i, title=t, chunks=n) for i, t, n in rows], total=total)

    @app.delete("/v1/documents", response_model=ClearedIndex, responses=_ERRORS,
                summary="Empty the proxy's index")
    async def clear_documents() -> ClearedIndex:
        documents, chunks = await state.index.clear()
        return ClearedIndex(deleted_documents=documents, deleted_chunks=chunks)

    @app.get("/v1/documents/{document_id}", response_model=IndexedDocument, operation_id="get_document",
             responses={404: {"model": ErrorResponse}, 401: {"model": ErrorResponse}},
             summary="One document of the proxy's index, as its chunks")
    async def get_document(document_id: str) -> IndexedDocument:
        chunks = await state.index.get(document_id)
        if not chunks:
            raise errors.APIError(404, f"no document {document_id!r} in the index", code="document_not_found",
                                  param="document_id")
        return IndexedDocument(id=document_id, title=chunks[0].title, chunks=[
            IndexedChunk(id=c.id, text=c.text, start=int(c.metadata["start"]), end=int(c.metadata["end"]))
            for c in chunks])

    @app.get("/v1/models", responses=_ERRORS,
             summary="The models served: the upstream's own list (passed through), or the local engine's")
    async def models(authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        if state.upstream is not None:
            return await state.upstream.models(authorization=authorization)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "ragzip"}]}

    @app.get("/healthz", response_model=Health, summary="Liveness: the process answers (dependencies not checked)")
    async def healthz() -> Health:
        backend = "upstream" if state.upstream is not None else "local"
        model = (config.upstream or "") if state.upstream is not None else config.model_name
        slots = state.slots or Slots()
        return Health(status="ok", backend=backend, model=model, index_chunks=state.index.size,
                      in_flight=slots.in_flight, queued=slots.queued, max_concurrency=config.max_concurrency)

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}},
             summary="Readiness: the upstream (or the local engine and its KV store) answers; 503 when not")
    async def readyz() -> Any:
        checks = await _check_readiness(state)
        ready = all(v == "ok" for k, v in checks.items() if k != "shared")
        body = Readiness(status="ready" if ready else "not_ready", checks=checks)
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


WORKER_CONFIG_ENV = "RAGZIP_SERVE_CONFIG"  # the validated config, as JSON, handed to worker processes


def serve(*, host: str = "127.0.0.1", port: int = 8000, upstream: str | None = None,
          config: Path | None = None, overrides: dict[str, Any] | None = None) -> None:
    """Run the proxy with uvicorn (blocking): one process, or `workers` processes sharing the port. `upstream` and
    `overrides` (non-None values) override the config file's.

    Raises:
        ConfigError: invalid config file or values, or a dependency that does not answer at startup.
    """
    cfg = load_config(config, **{"upstream": upstream, **(overrides or {})})
    settings = Settings()
    _log_to_stderr()
    workers = cfg.worker_count()
    engine = store = None
    if cfg.upstream is None:  # fail here, with the reason, rather than as a traceback inside uvicorn's startup
        log.info("loading the local engine %s (a packaged model's first run converts it once, up to a minute)",
                 cfg.llm or settings.llm)
        engine = load_engine(cfg, settings)
        store = open_kv_store(cfg.kv_store) if cfg.kv_store else None
    elif cfg.kv_store:
        log.warning("kv_store %r is not used: KV reuse runs in the local engine, and this server forwards to %s",
                    cfg.kv_store, cfg.upstream)
    if cfg.shared:
        problem = _ping_shared(cfg.shared)
        if problem is not None:
            log.warning("shared state %s does not answer (%s): workers start with their own state and retry it",
                        cfg.shared, problem)
    unshared = describe_unshared(workers, cfg.shared)
    if unshared:
        log.warning("%s", unshared)
    log.info("ragzip proxy on http://%s:%d (%s, %d worker%s); /readyz turns ready once the %r compressor is loaded",
             host, port, cfg.upstream or "local engine", workers, "" if workers == 1 else "s", cfg.method)
    if workers == 1:
        # On SIGTERM uvicorn stops accepting, lets in-flight requests finish for up to drain_timeout_s, then exit 0.
        app = create_app(cfg, settings=settings, engine=engine, kv_store=store)
        _DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="info",
                                       timeout_graceful_shutdown=cfg.drain_timeout_s)).run()
        return
    # The checks above ran once, here (and converted a packaged model once); each worker loads its own models. The
    # cores are split between the workers, so that N workers do not run N x all-cores threads.
    del engine, store
    cores = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    os.environ.setdefault("RAGZIP_NUM_THREADS", str(max(1, cores // workers)))
    os.environ.setdefault("OMP_NUM_THREADS", os.environ["RAGZIP_NUM_THREADS"])
    os.environ[WORKER_CONFIG_ENV] = cfg.model_dump_json()
    # uvicorn's supervisor binds once, starts the workers, restarts one that dies, and on SIGTERM has each drain
    # its in-flight requests (up to drain_timeout_s) before it exits 0.
    uvicorn.run("ragzip.server.app:worker_app", factory=True, host=host, port=port, workers=workers,
                log_level="info", timeout_graceful_shutdown=cfg.drain_timeout_s, timeout_worker_healthcheck=30)


def worker_app() -> FastAPI:
    """The app of one worker process of `serve(workers=N)` (uvicorn's factory): the config comes from the
    parent, already validated."""
    raw = os.environ.pop(WORKER_CONFIG_ENV, None)  # keys inside: not left for this worker's own children
    if not raw:
        raise ConfigError(f"{WORKER_CONFIG_ENV} is not set: worker_app is started by `ragzip serve --workers N`")
    settings = Settings()
    if settings.num_threads:
        import torch

        torch.set_num_threads(settings.num_threads)
    _log_to_stderr()
    return create_app(ServerConfig.model_validate_json(raw), settings=settings)


def _ping_shared(url: str) -> str | None:
    """None when the shared Redis answers, else why not."""
    try:
        redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001 - reported as a startup warning
        return f"{type(exc).__name__}: {exc}"
    return None


def _log_to_stderr() -> None:
    """The server's own start-up lines on stderr beside uvicorn's (once, and only when nothing else handles them)."""
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, except that a drained shutdown on SIGTERM/SIGINT exits 0: uvicorn re-raises the signal
    after shutting down, so supervisors would read a clean drain as a kill (status -15)."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
