"""Every error the proxy returns is mapped here to an OpenAI-style `{"error": {...}}` body."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ragzip.errors import ConfigError, InputError, ModelNotFoundError, RagzipError, UnsupportedModelError

log = logging.getLogger("ragzip.server")


class APIError(Exception):
    """An error with an HTTP status, an OpenAI error `type` and a machine-readable `code`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: Mapping[str, str] | None = None,
                 ragzip_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        # Beside an upstream's own `code` (passed through for clients that branch on it, such as
        # "context_length_exceeded"), what ragzip makes of the failure ("upstream_rejected", ...).
        self.ragzip_code = ragzip_code


class UpstreamError(APIError):
    """The upstream LLM failed, timed out or could not be reached (502/504)."""

    def __init__(self, status: int, message: str, *, code: str | None, ragzip_code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(status, message, type="upstream_error", code=code, param=param,
                         ragzip_code=ragzip_code or code)


def redacted(exc: BaseException) -> str:
    """An exception for the logs without its message (which may quote document text or keys): its type and
    where it was raised. The client still gets the message in its response."""
    tb = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in reversed(tb))
    return f"{type(exc).__name__} at {where}" if where else type(exc).__name__


def error_body(message: str, *, type: str, code: str | None = None, param: str | None = None,
               ragzip_code: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"message": message, "type": type, "code": code, "param": param}
    if ragzip_code is not None:
        body["ragzip_code"] = ragzip_code
    return {"error": body}


def _response(status: int, message: str, *, type: str, code: str | None = None, param: str | None = None,
              headers: Mapping[str, str] | None = None, ragzip_code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type=type, code=code, param=param, ragzip_code=ragzip_code),
                        status_code=status, headers=dict(headers or {}))


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return _response(exc.status, exc.message, type=exc.type, code=exc.code, param=exc.param, headers=exc.headers,
                     ragzip_code=exc.ragzip_code)


async def _ragzip_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, (InputError, ConfigError, ModelNotFoundError, UnsupportedModelError)):
        code = "model_not_found" if isinstance(exc, ModelNotFoundError) else type(exc).__name__
        return _response(400, str(exc), type="invalid_request_error", code=code)
    log.error("ragzip error on %s: %s", request.url.path, redacted(exc))
    return _response(500, str(exc), type="server_error", code=type(exc).__name__)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors()[:10]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        problems.append(f"{loc}: {err.get('msg', 'invalid')}")
    first = exc.errors()[0].get("loc", ()) if exc.errors() else ()
    param = ".".join(str(x) for x in first if x != "body") or None
    return _response(400, "invalid request: " + "; ".join(problems), type="invalid_request_error",
                     code="invalid_request", param=param)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _response(exc.status_code, str(exc.detail), type="invalid_request_error", code=code,
                     headers=exc.headers)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s: %s", request.url.path, redacted(exc))
    return _response(500, "internal server error", type="server_error", code="internal_error")


def install(app: FastAPI) -> None:
    """Register the handlers on `app` (the only place endpoint errors become HTTP responses)."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RagzipError, _ragzip_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
