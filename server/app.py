"""The FastAPI app: OpenAI-compatible chat completions with context compression, /v1/compress, index, health,
metrics. `create_app(config)` builds it; `serve(...)` runs it with uvicorn (what `ragzip serve` calls).

Example:
    >>> from ragzip.server.app import create_app
    >>> from ragzip.server.config import ServerConfig
    >>> app = create_app(ServerConfig(upstream="http://127.0.0.1:8001/v1", method="embed-topk"))
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse, Response

from ragzip.contract import parse_record, to_documents
from ragzip.server import errors
from ragzip.server.chat import chat_completion
from ragzip.server.compression import CompressionService
from ragzip.server.config import ServerConfig, load_config
from ragzip.server.guard import Guard, Slots
from ragzip.server.index import IndexService
from ragzip.server.metrics import Metrics
from ragzip.server.schemas import (
    AddDocumentsRequest,
    AddDocumentsResponse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompressRequest,
    CompressResponse,
    ErrorResponse,
    Health,
)
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
    backend: Any = None
    slots: Slots | None = None


def _load_backend(config: ServerConfig, settings: Settings, engine: Any, metrics: Metrics) -> Any:
    from ragzip.server.local import LocalBackend

    if engine is None:
        from ragzip.engine import LocalEngine

        if settings.num_threads:
            import torch

            torch.set_num_threads(settings.num_threads)
        engine = LocalEngine(config.llm or settings.llm, dtype=config.dtype or settings.dtype,
                             device=config.device or settings.device)
    kv_engine = None
    if config.kv_store:
        from ragzip.kv_engine import KVReuseEngine
        from ragzip.kvstore.stores.base import open_store

        kv_engine = KVReuseEngine(engine.model, engine.tokenizer, store=open_store(config.kv_store))
    return LocalBackend(engine, kv_engine=kv_engine, model_name=config.model_name, metrics=metrics)


def create_app(config: ServerConfig | None = None, *, settings: Settings | None = None, engine: Any = None) -> FastAPI:
    """Build the proxy.

    Args:
        config: server settings (default: `ServerConfig()`: local engine, method "exit", no auth).
        settings: process settings (default: read from `RAGZIP_*` environment variables once, here).
        engine: an already loaded `LocalEngine` to serve instead of loading one at startup (no upstream only).
    """
    config = config or ServerConfig()
    settings = settings or Settings()
    metrics = Metrics()
    tokenizer = config.tokenizer or settings.tokenizer
    device = config.device or settings.device
    state = ServerState(config, settings, metrics, CompressionService(config, metrics, tokenizer=tokenizer,
                                                                      device=device),
                        IndexService(config, tokenizer=tokenizer, device=device), slots=Slots())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import anyio

        if config.upstream:
            from ragzip.server.upstream import Upstream

            state.upstream = Upstream(config.upstream, api_key=config.upstream_api_key,
                                      timeout_s=config.upstream_timeout_s,
                                      connect_timeout_s=config.upstream_connect_timeout_s)
        else:
            state.backend = await anyio.to_thread.run_sync(_load_backend, config, settings, engine, metrics)
        try:
            yield
        finally:
            if state.upstream is not None:
                await state.upstream.aclose()

    from ragzip import __version__

    app = FastAPI(title="ragzip proxy", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible chat completions with RAG context compression.")
    app.state.ragzip = state
    errors.install(app)
    app.add_middleware(Guard, config=config, metrics=metrics, slots=state.slots)  # type: ignore[arg-type]

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**_ERRORS, **_STREAM},
              summary="Chat completion (OpenAI-compatible; `stream: true` answers with server-sent events)")
    async def chat(req: ChatCompletionRequest,
                   authorization: Annotated[str | None, Header()] = None) -> Any:
        return await chat_completion(state, req, authorization)

    @app.post("/v1/compress", response_model=CompressResponse, responses=_ERRORS,
              summary="Compress one CLI-contract record; returns it with `compressed` added")
    async def compress(req: CompressRequest) -> Any:
        if len(req.contexts) > config.max_documents:
            raise errors.APIError(400, f"{len(req.contexts)} contexts; this server accepts at most "
                                       f"{config.max_documents}", code="too_many_documents", param="contexts")
        record = req.model_dump(exclude_unset=True, exclude={"ragzip"})
        record["contexts"] = [c if isinstance(c, str) else c.model_dump(exclude_none=True) for c in req.contexts]
        question, docs = parse_record(record)
        plan = state.compression.plan(req.ragzip)
        result = await state.compression.compress(plan, question, docs)
        return JSONResponse({**record, "compressed": result.to_contract()})

    @app.post("/v1/documents", response_model=AddDocumentsResponse, responses=_ERRORS,
              summary="Add documents to the proxy's own index")
    async def add_documents(req: AddDocumentsRequest) -> AddDocumentsResponse:
        if len(req.documents) > config.max_documents:
            raise errors.APIError(400, f"{len(req.documents)} documents; at most {config.max_documents} per call",
                                  code="too_many_documents", param="documents")
        docs = to_documents([d.model_dump(exclude_none=True) for d in req.documents],
                            default_ids=state.index.next_ids(len(req.documents)))
        added = await state.index.add(docs)
        return AddDocumentsResponse(added_documents=len(docs), added_chunks=added, total_chunks=state.index.size)

    @app.get("/v1/models", responses=_ERRORS,
             summary="The models served: the upstream's own list (passed through), or the local engine's")
    async def models(authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        if state.upstream is not None:
            return await state.upstream.models(authorization=authorization)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "ragzip"}]}

    @app.get("/healthz", response_model=Health, summary="Liveness and backend summary")
    async def healthz() -> Health:
        backend = "upstream" if state.upstream is not None else "local"
        model = (config.upstream or "") if state.upstream is not None else config.model_name
        return Health(status="ok", backend=backend, model=model, index_chunks=state.index.size,
                      in_flight=state.slots.in_flight if state.slots else 0, max_concurrency=config.max_concurrency)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


def serve(*, host: str = "127.0.0.1", port: int = 8000, upstream: str | None = None,
          config: Path | None = None, overrides: dict[str, Any] | None = None) -> None:
    """Run the proxy with uvicorn (blocking). `upstream` and `overrides` (non-None values) override the config
    file's.

    Raises:
        ConfigError: invalid config file or values.
    """
    import uvicorn

    cfg = load_config(config, **{"upstream": upstream, **(overrides or {})})
    settings = Settings()
    log.info("ragzip proxy on http://%s:%d (%s)", host, port, cfg.upstream or "local engine")
    uvicorn.run(create_app(cfg, settings=settings), host=host, port=port, log_level="info")
