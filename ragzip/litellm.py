"""ragzip as a LiteLLM proxy guardrail: compress the retrieved context of chat requests before LiteLLM calls the LLM.

In LiteLLM's proxy config:

    guardrails:
      - guardrail_name: ragzip
        litellm_params:
          guardrail: ragzip.litellm.RagzipGuardrail
          mode: pre_call
          default_on: true
          method: exit          # compressor or '+'-joined pipeline (in-process)
          rate: 0.5             # or target_tokens: 1500
          # api_base: http://127.0.0.1:8000   # compress by calling a ragzip server (its /v1/compress) instead

The context is what the ragzip proxy reads: a request's `documents` list (an extra body key, removed before the
LLM call) or a `<documents>` block in the messages; the question is the last user message. The compressed context
goes back as a `<documents compressed-by="ragzip">` block, in place of the block or in front of the last user
message. A request may set its own `ragzip` object (`rate`, `target_tokens`, and `method` when it is the configured
one or in `allowed_methods`).

Fail-open (the default): when compression fails, times out or the ragzip server is unreachable, the request goes on
with its context uncompressed (documents sent as `documents` are still put into the prompt), and says why. Savings
are reported in response headers (`x-ragzip-method`, `x-ragzip-tokens-before`, `x-ragzip-tokens-after`,
`x-ragzip-fallback`), in the request metadata (`metadata["ragzip_guardrail"]`) and in LiteLLM's guardrail logging.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import httpx
from litellm.integrations.custom_guardrail import CustomGuardrail
from litellm.types.guardrails import GuardrailEventHooks

from ragzip.contract import to_documents
from ragzip.server.context import extract, inject
from ragzip.types import Document

log = logging.getLogger("ragzip.litellm")
_CHAT_CALLS = frozenset({"completion", "acompletion"})
_INFO = "ragzip_guardrail"  # this guardrail's own metadata key (a client's metadata["ragzip"] is not trusted)
_REQUEST_KEYS = frozenset({"method", "rate", "target_tokens"})


class RagzipGuardrail(CustomGuardrail):
    """A LiteLLM `pre_call` guardrail that compresses retrieved context (see the module doc).

    Args:
        method: compressor or pipeline (default "exit").
        rate / target_tokens: the default budget (at most one; default: the method's own, auto for exit).
        tokenizer: what counts budgets in-process (default: ragzip's default LLM's tokenizer).
        options: options of `method` (in-process).
        api_base: a ragzip server (e.g. http://127.0.0.1:8000): compress by calling its /v1/compress.
        api_key: the ragzip server's API key (api_base only).
        timeout_s: the longest compression wait before failing open (default 10).
        fail_open: True (default): a failure forwards the request uncompressed; False: the request fails.
        allowed_methods: methods a request may choose with `ragzip.method` (besides `method`).
        **kwargs: LiteLLM's own guardrail parameters (guardrail_name, event_hook, default_on, ...).
    """

    def __init__(self, method: str = "exit", rate: float | None = None, target_tokens: int | None = None,
                 tokenizer: str | None = None, options: Mapping[str, Any] | None = None, api_base: str | None = None,
                 api_key: str | None = None, timeout_s: float = 10.0, fail_open: bool = True,
                 allowed_methods: list[str] | None = None, **kwargs: Any) -> None:
        if rate is not None and target_tokens is not None:
            raise ValueError("ragzip guardrail: give at most one of rate and target_tokens")
        if rate is not None and not 0 < float(rate) <= 1:
            raise ValueError(f"ragzip guardrail: rate must be in (0, 1], got {rate}")
        self.method = method
        self.rate = None if rate is None else float(rate)
        self.target_tokens = None if target_tokens is None else int(target_tokens)
        self.tokenizer = tokenizer
        self.options = dict(options or {})
        self.api_base = api_base.rstrip("/") if api_base else None
        self.api_key = api_key
        self.timeout_s = float(timeout_s)
        self.fail_open = _boolean(fail_open)
        self.allowed_methods = {method, *(allowed_methods or [])}
        self._compressors: dict[str, tuple[Any, threading.Lock]] = {}
        self._build_lock = threading.Lock()
        self._client: httpx.AsyncClient | None = None  # one connection pool to the ragzip server
        super().__init__(**kwargs)

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict[str, Any],
                                  call_type: str) -> dict[str, Any] | None:
        if isinstance(data.get("metadata"), dict):
            data["metadata"].pop(_INFO, None)  # only this hook writes it (the headers hook reads it)
        if call_type not in _CHAT_CALLS or not isinstance(data.get("messages"), list):
            return None
        if not self.should_run_guardrail(data=data, event_type=GuardrailEventHooks.pre_call):
            return None
        explicit = data.pop("documents", None)
        options = data.pop("ragzip", None) or {}
        started = time.perf_counter()
        try:
            ctx = extract([dict(m) for m in data["messages"]],
                          to_documents(explicit, where="documents") if explicit else None)
        except Exception as exc:  # noqa: BLE001 - malformed documents: the request goes on without them
            if not self.fail_open:
                raise
            log.warning("ragzip guardrail: the request's documents are malformed (%s); forwarding it as it is",
                        type(exc).__name__)
            self._report(data, {"method": "none", "tokens_before": None, "tokens_after": None,
                                "fallback": f"malformed documents: {type(exc).__name__}", "seconds": 0.0}, started)
            return data
        if not ctx.documents or ctx.already_compressed:
            if explicit:  # nothing to compress, but the documents still belong in the prompt
                data["messages"] = inject(ctx, ctx.documents)
            return data
        try:
            method, budget = self._plan(options)
            compressed = await asyncio.wait_for(self._compress(ctx.query, ctx.documents, method, budget),
                                                self.timeout_s)
            kept = [Document(c["id"], c["text"], c.get("title") or "") for c in compressed["contexts"]
                    if c["text"].strip()]
            info = {"method": compressed["method"], "tokens_before": compressed["tokens_before"],
                    "tokens_after": compressed["tokens_after"], "fallback": None}
        except Exception as exc:  # noqa: BLE001 - fail-open: any compressor failure forwards the context as it is
            if not self.fail_open:
                raise
            timed_out = isinstance(exc, (TimeoutError, asyncio.TimeoutError))  # distinct classes before 3.11
            reason = "timeout" if timed_out else f"{type(exc).__name__}: {exc}"[:300]
            log.warning("ragzip guardrail: compression failed (%s); forwarding the context uncompressed", reason)
            kept, info = ctx.documents, {"method": "none", "tokens_before": None, "tokens_after": None,
                                         "fallback": reason}
        info["seconds"] = round(time.perf_counter() - started, 6)
        if info["tokens_before"] is not None:
            info["tokens_saved"] = info["tokens_before"] - info["tokens_after"]
        data["messages"] = inject(ctx, kept)
        self._report(data, info, started)
        return data

    async def async_post_call_response_headers_hook(self, data: dict[str, Any], user_api_key_dict: Any,
                                                    response: Any, request_headers: Any = None,
                                                    litellm_call_info: Any = None) -> dict[str, str] | None:
        info = (data.get("metadata") or {}).get(_INFO)
        if not isinstance(info, dict) or "method" not in info:
            return None
        headers = {"x-ragzip-method": str(info["method"])}
        if info.get("tokens_before") is not None:
            headers.update({"x-ragzip-tokens-before": str(info["tokens_before"]),
                            "x-ragzip-tokens-after": str(info["tokens_after"])})
        if info.get("fallback"):
            headers["x-ragzip-fallback"] = "timeout" if info["fallback"] == "timeout" else "uncompressed"
        return headers

    def _plan(self, options: Any) -> tuple[str, dict[str, Any]]:
        """The method and budget for one request: its `ragzip` object over the guardrail's defaults."""
        if not isinstance(options, dict) or set(options) - _REQUEST_KEYS:
            raise ValueError(f"the request's ragzip object may set only {sorted(_REQUEST_KEYS)}")
        method = options.get("method") or self.method
        if method not in self.allowed_methods:
            raise ValueError(f"method {method!r} is not allowed here; allowed: {sorted(self.allowed_methods)}")
        if options.get("rate") is not None or options.get("target_tokens") is not None:
            budget = {k: options[k] for k in ("rate", "target_tokens") if options.get(k) is not None}
        else:
            budget = {k: v for k, v in (("rate", self.rate), ("target_tokens", self.target_tokens)) if v is not None}
        return method, budget

    async def _compress(self, query: str, documents: list[Document], method: str,
                        budget: dict[str, Any]) -> dict[str, Any]:
        """The contract's `compressed` object, from the ragzip server at `api_base` or in-process."""
        if self.api_base is not None:
            record = {"question": query, "contexts": [{"id": d.id, "title": d.title, "text": d.text}
                                                      for d in documents],
                      "ragzip": {"method": method, **budget}}
            headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            if self._client is None:
                self._client = httpx.AsyncClient(timeout=self.timeout_s)
            r = await self._client.post(f"{self.api_base}/v1/compress", json=record, headers=headers)
            r.raise_for_status()
            compressed = r.json()["compressed"]
            if not isinstance(compressed, dict) or not isinstance(compressed.get("contexts"), list):
                raise ValueError("the ragzip server's answer has no compressed contexts")
            return compressed
        return await asyncio.to_thread(self._compress_here, query, documents, method, budget)

    def _compress_here(self, query: str, documents: list[Document], method: str,
                       budget: dict[str, Any]) -> dict[str, Any]:
        from ragzip.api import RagZip

        with self._build_lock:
            if method not in self._compressors:
                opts = self.options if method == self.method else {}
                self._compressors[method] = (RagZip(method, tokenizer=self.tokenizer, **opts), threading.Lock())
            compressor, lock = self._compressors[method]
        with lock:  # a compressor's tokenizers and encoders are not shared between threads
            return compressor.compress(query, documents, **budget).to_contract()  # type: ignore[no-any-return]

    def _report(self, data: dict[str, Any], info: dict[str, Any], started: float) -> None:
        """Savings in the request metadata (read back by the headers hook) and in LiteLLM's guardrail logging."""
        metadata = data.get("metadata")
        if not isinstance(metadata, dict):
            metadata = data["metadata"] = {}
        metadata[_INFO] = info
        try:
            from litellm.proxy.common_utils.callback_utils import add_guardrail_to_applied_guardrails_header

            add_guardrail_to_applied_guardrails_header(request_data=data, guardrail_name=self.guardrail_name)
            self.add_standard_logging_guardrail_information_to_request_data(
                guardrail_json_response=info, request_data=data,
                guardrail_status="success" if not info["fallback"] else "guardrail_failed_to_respond",
                guardrail_provider="ragzip", start_time=started, end_time=time.perf_counter(),
                duration=info["seconds"])
        except (ImportError, TypeError, AttributeError) as exc:  # reporting only: an older LiteLLM lacks a helper
            log.debug("ragzip guardrail: LiteLLM's guardrail logging is unavailable (%s)", exc)


def _boolean(value: Any) -> bool:
    """YAML gives booleans; environment-style strings are accepted too."""
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off")
    return bool(value)
