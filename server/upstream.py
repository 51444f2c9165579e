"""An httpx client for an OpenAI-compatible upstream, with its failures mapped to clear API errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from ragzip.server.errors import APIError, UpstreamError


def _upstream_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return resp.text[:300] or resp.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body["error"]))[:500]
    return str(body)[:300]


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
        if resp.status_code < 400:
            return
        message = f"upstream returned {resp.status_code}: {_upstream_message(resp)}"
        if resp.status_code >= 500:
            raise UpstreamError(502, message, code="upstream_error")
        if resp.status_code in (401, 403):
            raise UpstreamError(502, message + " (check the proxy's upstream_api_key)", code="upstream_auth")
        if resp.status_code == 429:
            raise APIError(429, message, type="rate_limit_error", code="upstream_rate_limited")
        raise APIError(resp.status_code, message, code="upstream_rejected")

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

    async def open_stream(self, body: dict[str, Any], *, authorization: str | None = None) -> httpx.Response:
        """Send a streaming request and check its status before any byte goes to the client (so that
        failures still get a proper status code). The caller must close the returned response."""
        request = self.client.build_request("POST", f"{self.base_url}/chat/completions", json=body,
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
