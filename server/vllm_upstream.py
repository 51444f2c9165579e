"""Chat completions through a vLLM upstream (`upstream_kind: "vllm"`): the answer prompt as token ids.

A chat request with documents becomes one `/v1/completions` call: the prompt laid out by `ragzip.vllm.layout`
(stable pieces, documents in a canonical order) and `kv_transfer_params` naming each document's span, which the
ragzip KV connector in vLLM uses (vLLM without it ignores them). The completion is returned in the chat shape,
streamed or not, with what vLLM reported about reuse under `ragzip.vllm`. A request without documents is a plain
chat and goes to `/chat/completions` as with any upstream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from ragzip.prompt import PromptBuilder
from ragzip.server.context import ChatContext
from ragzip.server.errors import APIError, UpstreamError, error_body
from ragzip.server.local import conversation
from ragzip.server.schemas import ChatCompletionRequest
from ragzip.types import Document
from ragzip.vllm.layout import LaidOutPrompt, lay_out

# Chat fields with the same meaning in /v1/completions (OpenAI's and vLLM's sampling extras). Fields that only
# label a request are dropped; any other field is refused, never silently dropped (tools, response_format,
# logprobs, chat_template_kwargs, ... cannot be carried by a token-id prompt).
_PASSED = ("model", "temperature", "top_p", "stop", "seed", "n", "presence_penalty", "frequency_penalty",
           "top_k", "min_p", "repetition_penalty", "stream_options", "ignore_eos", "min_tokens", "stop_token_ids",
           "skip_special_tokens", "include_stop_str_in_output")
_LABELS = ("user", "store", "metadata", "service_tier", "max_tokens", "max_completion_tokens", "stream")


def completion_body(req: ChatCompletionRequest, prompt: LaidOutPrompt) -> dict[str, Any]:
    """The `/v1/completions` body for a chat request (APIError 400 for a field the prompt form cannot honour)."""
    given = req.model_dump(exclude_unset=True, exclude={"documents", "ragzip", "messages"})
    refused = sorted(k for k, v in given.items() if k not in _PASSED and k not in _LABELS and v is not None)
    if refused:
        raise APIError(400, f"{', '.join(refused)} cannot be sent through upstream_kind 'vllm' (the proxy sends the "
                            "answer prompt as token ids)", code="unsupported_parameter", param=refused[0])
    body = {k: given[k] for k in _PASSED if k in given}
    # Unset means "until the model stops or the context ends", as in chat; /v1/completions would stop at 16.
    body["max_tokens"] = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    body["prompt"] = prompt.token_ids
    body["stream"] = bool(req.stream)
    body["kv_transfer_params"] = prompt.kv_transfer_params()
    return body


def _chat_id(completion_id: Any) -> str:
    text = str(completion_id or "")
    return "chatcmpl-" + text.removeprefix("cmpl-")


def as_chat(data: dict[str, Any]) -> dict[str, Any]:
    """A `/v1/completions` response in the chat completion shape."""
    choices = [{"index": c.get("index", i), "message": {"role": "assistant", "content": c.get("text", "")},
                "finish_reason": c.get("finish_reason")} for i, c in enumerate(data["choices"])]
    out = {"id": _chat_id(data.get("id")), "object": "chat.completion", "created": data.get("created"),
           "model": data.get("model"), "choices": choices}
    if "usage" in data:
        out["usage"] = data["usage"]
    return out


def _chunk_as_chat(data: dict[str, Any], started: set[int]) -> dict[str, Any]:
    """A completion chunk as a chat chunk; each choice's first delta carries the role (`started`: choices seen)."""
    choices = []
    for i, c in enumerate(data.get("choices") or []):
        index = c.get("index", i)
        delta: dict[str, Any] = {"content": c.get("text", "")}
        if index not in started:
            started.add(index)
            delta["role"] = "assistant"
        choices.append({"index": index, "delta": delta, "finish_reason": c.get("finish_reason")})
    out = {"id": _chat_id(data.get("id")), "object": "chat.completion.chunk", "created": data.get("created"),
           "model": data.get("model"), "choices": choices}
    if data.get("usage") is not None:
        out["usage"] = data["usage"]
    return out


async def via_vllm(state: Any, req: ChatCompletionRequest, ctx: ChatContext, kept: list[Document],
                   info: dict[str, Any], headers: dict[str, str], authorization: str | None) -> Any:
    builder: PromptBuilder = state.prompt_builder
    chat = conversation(ctx.messages)
    prompt = lay_out(builder, ctx.query, kept, system=chat.system, history=chat.history,
                     canonical=state.config.canonical_order)
    body = completion_body(req, prompt)
    forward_auth = authorization if not state.config.accepted_keys else None
    layout = {"prompt_tokens": len(prompt.token_ids), "documents": len(prompt.spans), "order": prompt.order}
    try:
        if not req.stream:
            data = await state.upstream.completion(body, authorization=forward_auth)
            out = as_chat(data)
            out["ragzip"] = {**info, "vllm": {**layout, "kv": data.get("kv_transfer_params")}}
            return JSONResponse(out, headers=headers)
        resp = await state.upstream.open_stream(body, authorization=forward_auth, path="/completions")
    except UpstreamError as exc:
        state.metrics.upstream_errors.labels(exc.ragzip_code or exc.code or "upstream").inc()
        raise

    async def events() -> AsyncIterator[str]:
        first = True
        started: set[int] = set()
        try:
            async for payload in state.upstream.iter_events(resp):
                if payload == "[DONE]":
                    yield "data: [DONE]\n\n"
                    continue
                try:
                    data = json.loads(payload)
                except json.JSONDecodeError:
                    continue
                if not isinstance(data, dict):
                    continue
                if "error" in data:
                    yield f"data: {payload}\n\n"
                    continue
                chunk = _chunk_as_chat(data, started)
                if first:
                    chunk["ragzip"] = {**info, "vllm": layout}
                    first = False
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except UpstreamError as exc:
            state.metrics.upstream_errors.labels(exc.ragzip_code or exc.code or "upstream").inc()
            failure = error_body(exc.message, type=exc.type, code=exc.code, ragzip_code=exc.ragzip_code)
            yield f"data: {json.dumps(failure)}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})


__all__ = ["as_chat", "completion_body", "via_vllm"]
