"""`POST /v1/chat/completions`: find the context, compress it, and answer through the upstream or the local engine."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from ragzip.contract import to_documents
from ragzip.server.compression import Outcome, check_size
from ragzip.server.config import KeyPolicy
from ragzip.server.context import ChatContext, extract, inject
from ragzip.server.errors import APIError, UpstreamError, error_body
from ragzip.server.local import GenerationDone
from ragzip.server.schemas import ChatCompletionRequest, plain_documents
from ragzip.server.vllm_upstream import via_vllm
from ragzip.types import Document


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# x-ragzip-fallback per reason; a failed compressor keeps the value it always had.
_FALLBACK_HEADER = {"error": "uncompressed", "overload": "overload", "timeout": "timeout"}


def ragzip_info(ctx: ChatContext, outcome: Outcome) -> dict[str, Any]:
    c = outcome.compressed
    return {"method": c["method"], "tokens_before": c["tokens_before"], "tokens_after": c["tokens_after"],
            "rate": c.get("rate"), "seconds": c.get("seconds", 0.0), "source": ctx.source,
            "num_documents": len(ctx.documents), "fallback": outcome.fallback,
            "fallback_reason": outcome.fallback_reason, "result_source": outcome.source,
            "already_compressed": ctx.already_compressed, "budget": dict(c.get("budget") or {}), "auto": c.get("auto")}


def ragzip_headers(info: dict[str, Any]) -> dict[str, str]:
    headers = {"x-ragzip-method": str(info["method"]), "x-ragzip-tokens-before": str(info["tokens_before"]),
               "x-ragzip-tokens-after": str(info["tokens_after"]), "x-ragzip-rate": str(info["rate"]),
               "x-ragzip-source": str(info["source"]), "x-ragzip-result-source": str(info["result_source"])}
    if info["fallback"]:
        headers["x-ragzip-fallback"] = _FALLBACK_HEADER.get(info["fallback_reason"] or "error", "uncompressed")
    return headers


async def prepare(state: Any, req: ChatCompletionRequest, key: KeyPolicy | None = None
                  ) -> tuple[ChatContext, Outcome, list[Document]]:
    """Context from `documents`, a `<documents>` block, or the proxy index; then compression (with fallback)."""
    cfg = state.config
    if req.documents is not None and len(req.documents) > cfg.max_documents:
        raise APIError(400, f"{len(req.documents)} documents; this server accepts at most {cfg.max_documents}",
                       code="too_many_documents", param="documents")
    messages = [m.model_dump(exclude_unset=True) for m in req.messages]
    explicit = to_documents(plain_documents(req.documents)) if req.documents else None
    ctx = extract(messages, explicit)
    if len(ctx.documents) > cfg.max_documents:
        raise APIError(400, f"{len(ctx.documents)} documents in the messages; this server accepts at most "
                            f"{cfg.max_documents}", code="too_many_documents", param="messages")
    check_size(cfg, ctx.documents, param="documents" if explicit else "messages")
    opts = req.ragzip
    plan = state.compression.plan(opts, key)
    retrieve = not ctx.documents and (opts is None or opts.retrieve is not False)
    if retrieve:
        await state.index.sync()  # documents another worker added (shared state)
    if retrieve and state.index.size:
        k = (opts.top_k if opts and opts.top_k else None) or cfg.top_k
        ctx.documents = await state.index.search(ctx.query, k)
        ctx.source = "index" if ctx.documents else "none"
    if ctx.already_compressed:  # compressed by a ragzip server in front of this one: passed on as it is
        outcome = await state.compression.uncompressed(ctx.documents)
    else:
        outcome = await state.compression.compress_or_fallback(plan, ctx.query, ctx.documents)
    return ctx, outcome, outcome.documents


def check_local_request(state: Any, req: ChatCompletionRequest) -> None:
    """Refuse what the local engine would otherwise ignore silently: another model's name, several choices."""
    served = state.backend.model_names
    if req.model is not None and req.model not in served:
        raise APIError(404, f"model {req.model!r} is not served here; this server serves {sorted(served)}",
                       code="model_not_found", param="model")
    n = (req.model_extra or {}).get("n")
    if n is not None and n != 1:
        raise APIError(400, f"the local engine answers one choice per request; n must be 1, got {n!r}",
                       code="unsupported_parameter", param="n")


async def chat_completion(state: Any, req: ChatCompletionRequest, authorization: str | None,
                          key: KeyPolicy | None = None) -> Any:
    if state.upstream is None:
        check_local_request(state, req)
    ctx, outcome, kept = await prepare(state, req, key)
    info = ragzip_info(ctx, outcome)
    headers = ragzip_headers(info)
    if state.prompt_builder is not None and kept:  # upstream_kind vllm: the answer prompt as token ids
        return await via_vllm(state, req, ctx, kept, info, headers, authorization)
    if state.upstream is not None:
        return await _via_upstream(state, req, ctx, kept, info, headers, authorization)
    return await _via_local(state, req, ctx, kept, info, headers)


async def _via_upstream(state: Any, req: ChatCompletionRequest, ctx: ChatContext, kept: list[Document],
                        info: dict[str, Any], headers: dict[str, str], authorization: str | None) -> Any:
    body = req.model_dump(exclude_unset=True, exclude={"documents", "ragzip"})
    body["messages"] = inject(ctx, kept)
    forward_auth = authorization if not state.config.accepted_keys else None
    try:
        if not req.stream:
            data = await state.upstream.chat(body, authorization=forward_auth)
            data["ragzip"] = info
            return JSONResponse(data, headers=headers)
        resp = await state.upstream.open_stream(body, authorization=forward_auth)
    except UpstreamError as exc:
        state.metrics.upstream_errors.labels(exc.ragzip_code or exc.code or "upstream").inc()
        raise

    async def events() -> AsyncIterator[str]:
        first = True
        try:
            async for payload in state.upstream.iter_events(resp):
                if payload == "[DONE]":
                    yield "data: [DONE]\n\n"
                    continue
                if first:
                    try:
                        chunk = json.loads(payload)
                    except json.JSONDecodeError:
                        chunk = None
                    if isinstance(chunk, dict):
                        chunk["ragzip"] = info
                        payload = json.dumps(chunk, ensure_ascii=False)
                    first = False
                yield f"data: {payload}\n\n"
        except UpstreamError as exc:
            state.metrics.upstream_errors.labels(exc.ragzip_code or exc.code or "upstream").inc()
            yield _sse(error_body(exc.message, type=exc.type, code=exc.code, ragzip_code=exc.ragzip_code))

    return StreamingResponse(events(), media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})


def _max_new_tokens(state: Any, req: ChatCompletionRequest) -> int:
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    cfg = state.config
    return min(asked if asked is not None else cfg.default_max_new_tokens, cfg.max_new_tokens)


async def _via_local(state: Any, req: ChatCompletionRequest, ctx: ChatContext, kept: list[Document],
                     info: dict[str, Any], headers: dict[str, str]) -> Any:
    backend = state.backend
    messages = ctx.messages
    max_new = _max_new_tokens(state, req)
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), backend.model_name
    if not req.stream:
        text, done = await backend.complete(messages, query=ctx.query, documents=kept, max_new_tokens=max_new)
        state.metrics.generated_tokens.inc(done.completion_tokens)
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                 "total_tokens": done.prompt_tokens + done.completion_tokens}
        body = {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": done.finish_reason}],
                "usage": usage, "ragzip": {**info, **({"kv": done.kv} if done.kv else {})}}
        return JSONResponse(body, headers=headers)
    include_usage = bool((req.stream_options or {}).get("include_usage"))

    def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> str:
        return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    async def events() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""}, None, ragzip=info)
        done = GenerationDone(0, 0, "stop")
        try:
            async for item in backend.stream(messages, query=ctx.query, documents=kept, max_new_tokens=max_new):
                if isinstance(item, GenerationDone):
                    done = item
                else:
                    yield chunk({"content": item}, None)
        except Exception as exc:  # headers are gone: report the failure in-band, as OpenAI streams do
            yield _sse(error_body(f"generation failed: {type(exc).__name__}: {exc}", type="server_error",
                                  code="generation_failed"))
            return
        state.metrics.generated_tokens.inc(done.completion_tokens)
        yield chunk({}, done.finish_reason, **({"ragzip": {"kv": done.kv}} if done.kv else {}))
        if include_usage:
            yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": {"prompt_tokens": done.prompt_tokens,
                                                 "completion_tokens": done.completion_tokens,
                                                 "total_tokens": done.prompt_tokens + done.completion_tokens}})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})
