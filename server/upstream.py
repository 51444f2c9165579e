"""An httpx client for an OpenAI-compatible upstream, with its failures mapped to clear API errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from ragzip.server.errors import APIError, UpstreamError

# Headers of an upstream's error that clients act on (the OpenAI SDKs time their retries by them).
_PASSED_HEADERS = ("retry-after", "retry-after-ms", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                   "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                   "x-ratelimit-reset-tokens")


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    """What an upstream said when it refused a call: its message and, from an OpenAI error body, its own
    `type`, `code` and `param`, plus the headers clients act on."""

    status: int
    message: str
    type: str | None = None
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _text_or_none(value: Any) -> str | None:
    return str(value)[:200] if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def read_failure(resp: httpx.Response) -> UpstreamFailure:
    headers = {k: resp.headers[k] for k in _PASSED_HEADERS if k in resp.headers}
    try:
        body = resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return UpstreamFailure(resp.status_code, resp.text[:300] or resp.reason_phrase, headers=headers)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return UpstreamFailure(resp.status_code, str(error.get("message", error))[:500],
                               _text_or_none(error.get("type")), _text_or_none(error.get("code")),
                               _text_or_none(error.get("param")), headers)
    return UpstreamFailure(resp.status_code, str(body)[:300], headers=headers)


class Upstream:
    """POSTs chat completions to `{base_url}/chat/completions`.

    Args:
        base_url: the upstream's OpenAI base URL, including `/v1` (as the `openai` client's `base_url`).
        api_key: sent as `Authorization: Bearer ...`; when None, the caller may forward its own header.
        timeout_s: read/write timeout of one call; connect_timeout_s: connection timeout.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 120.0,
                 connect_timeout_s: float = 5.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.client = httpx.AsyncClient(timeout=timeout, transport=transport,
                                        limits=httpx.Limits(max_connections=64, max_keepalive_connections=16))

    def _headers(self, authorization: str | None) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        elif authorization:
            headers["authorization"] = authorization
        return headers

    def _raise_for(self, resp: httpx.Response) -> None:
        """An upstream error status as an APIError that keeps what clients branch on: the upstream's `code`,
        `param` and `type` (e.g. `context_length_exceeded`), its status for refusals (4xx) and its Retry-After;
        ragzip's own reading goes in `ragzip_code`."""
        if resp.status_code < 400:
            return
        failure = read_failure(resp)
        message = f"upstream returned {resp.status_code}: {failure.message}"
        if resp.status_code >= 500:
            raise UpstreamError(502, message, code=failure.code or "upstream_error", param=failure.param,
                                ragzip_code="upstream_error")
        if resp.status_code in (401, 403):  # the proxy's own upstream key is wrong: not the client's fault
            # the proxy's own key is wrong: the upstream's "invalid_api_key" would point the client at its key
            raise UpstreamError(502, message + " (check the proxy's upstream_api_key)", code="upstream_auth")
        if resp.status_code == 429:
            raise APIError(429, message, type=failure.type or "rate_limit_error",
                           code=failure.code or "rate_limit_exceeded", param=failure.param, headers=failure.headers,
                           ragzip_code="upstream_rate_limited")
        raise APIError(resp.status_code, message, type=failure.type or "invalid_request_error",
                       code=failure.code or "upstream_rejected", param=failure.param, headers=failure.headers,
                       ragzip_code="upstream_rejected")

    def _transport_error(self, exc: httpx.HTTPError) -> UpstreamError:
        if isinstance(exc, httpx.TimeoutException):
            return UpstreamError(504, f"upstream {self.base_url} timed out ({type(exc).__name__}, "
                                      f"limit {self.timeout_s:g}s)", code="upstream_timeout")
        return UpstreamError(502, f"upstream {self.base_url} unreachable: {type(exc).__name__}: {exc}",
                             code="upstream_unreachable")

    async def _json(self, method: str, path: str, authorization: str | None, **kwargs: Any) -> dict[str, Any]:
        """One call's JSON object body; transport failures, error statuses and non-object bodies as API errors."""
        try:
            resp = await self.client.request(method, f"{self.base_url}{path}", headers=self._headers(authorization),
                                             **kwargs)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        self._raise_for(resp)
        try:
            data = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UpstreamError(502, f"upstream {path} body is not JSON", code="upstream_bad_response") from None
        if not isinstance(data, dict):
            raise UpstreamError(502, f"upstream {path} body is not a JSON object", code="upstream_bad_response")
        return data

    async def chat(self, body: dict[str, Any], *, authorization: str | None = None) -> dict[str, Any]:
        """One non-streaming completion: the upstream's JSON object."""
        data = await self._json("POST", "/chat/completions", authorization, json=body)
        if not isinstance(data.get("choices"), list):
            raise UpstreamError(502, "upstream response has no 'choices' list", code="upstream_bad_response")
        return data

    async def completion(self, body: dict[str, Any], *, authorization: str | None = None) -> dict[str, Any]:
        """One non-streaming `/completions` call (vLLM's token-id prompts): the upstream's JSON object."""
        data = await self._json("POST", "/completions", authorization, json=body)
        if not isinstance(data.get("choices"), list):
            raise UpstreamError(502, "upstream response has no 'choices' list", code="upstream_bad_response")
        return data

    async def models(self, *, authorization: str | None = None) -> dict[str, Any]:
        """The upstream's own `GET /models` list (OpenAI shape: `{"object": "list", "data": [...]}`)."""
        data = await self._json("GET", "/models", authorization)
        if not isinstance(data.get("data"), list) or not all(
                isinstance(m, dict) and isinstance(m.get("id"), str) for m in data["data"]):
            raise UpstreamError(502, "upstream /models is not an OpenAI model list", code="upstream_bad_response")
        return {"object": "list", "data": data["data"]}

    async def ping(self, timeout_s: float) -> str | None:
        """None when the upstream answers `GET /models` with a status below 500 within `timeout_s` (a 401 still
        proves it is up), else why not. For readiness probes."""
        try:
            resp = await self.client.get(f"{self.base_url}/models", headers=self._headers(None), timeout=timeout_s)
        except httpx.HTTPError as exc:
            return f"upstream {self.base_url} unreachable: {type(exc).__name__}"
        if resp.status_code >= 500:
            return f"upstream {self.base_url}/models returned {resp.status_code}"
        return None

    async def open_stream(self, body: dict[str, Any], *, authorization: str | None = None,
                          path: str = "/chat/completions") -> httpx.Response:
        """Send a streaming request and check its status before any byte goes to the client (so that
        failures still get a proper status code). The caller must close the returned response."""
        request = self.client.build_request("POST", f"{self.base_url}{path}", json=body,
                                            headers={**self._headers(authorization), "accept": "text/event-stream"})
        try:
            resp = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if resp.status_code >= 400:
            try:
                await resp.aread()
            except httpx.HTTPError as exc:
                raise self._transport_error(exc) from None
            finally:
                await resp.aclose()
            self._raise_for(resp)
        return resp

    async def iter_events(self, resp: httpx.Response) -> AsyncIterator[str]:
        """The `data:` payloads of an SSE stream; a mid-stream failure raises UpstreamError."""
        try:
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    yield line[5:].strip()
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        finally:
            await resp.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()
