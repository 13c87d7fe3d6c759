"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and the request-body limit.

Every error a client can cause is a 4xx in that shape: validation errors name the field (``param``), unknown routes
are 404, a body over ``serve.max_request_bytes`` is 413 before it is parsed. A failure inside the server is a 500
or 503 whose message names the kind of failure only: tracebacks, pids and addresses stay in the logs.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse as _JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.serve.protocol import ErrorResponse

GENERATE_ERRORS = (400, 401, 404, 405, 413, 503, 504)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: Any = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def replica_failed(exc: Exception) -> APIError:
    """A replica that died (killed, OOM, node lost) fails only the requests it was running: a short 503 (Ray's death
    report names pids, IPs and actor ids; that stays in the logs). Serve replaces the replica."""
    return APIError(
        503,
        f"The model replica serving this request failed ({type(exc).__name__}); retry the request.",
        "server_error",
        code="replica_failed",
    )


def engine_failed() -> APIError:
    """The replica's engine raised while generating: every request it was running fails at once with this 503 (the
    replica goes on serving); the exception itself is in the replica's log."""
    return APIError(
        503, "Generation failed on the model replica; retry the request.", "server_error", code="engine_failure"
    )


class JSONResponse(_JSONResponse):
    """JSON with non-ASCII escaped. A client may send a lone surrogate (``"\\ud800"`` is valid JSON) that comes back
    in a model id, an echoed prompt or an error message; Starlette's UTF-8 rendering raises on it (a 500), while
    ``\\uXXXX`` escapes represent any Python string, exactly as the client sent it."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(exc: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    if exc.status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(exc.body(), exc.status, headers=headers)


def documented(*statuses: int, stream: bool = False, model: Any = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of a route: its error statuses and, for generating routes, the JSON body (``model``)
    and the SSE stream."""
    responses: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse} for status in statuses}
    if stream:
        event = {"type": "string", "description": "A JSON chunk (or an error), then [DONE]."}
        sse = {"schema": {"type": "object", "required": ["data"], "properties": {"data": event}}}  # each event
        responses[200] = {
            "description": "JSON, or server-sent events with stream",
            "content": {"text/event-stream": sse},
        }
        if model is not None:
            responses[200]["model"] = model
    return responses


def _http_api_error(exc: StarletteHTTPException) -> APIError:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    code = "request_too_large" if exc.status_code == 413 else None
    return APIError(exc.status_code, str(exc.detail), kind, code=code)


class RequestBodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 in OpenAI's shape before it is parsed.

    A declared ``Content-Length`` over the limit is refused without reading the body; a chunked body is counted as
    it arrives and refused once past the limit (FastAPI re-raises HTTP exceptions raised while it reads the body).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> StarletteHTTPException:
        return StarletteHTTPException(413, f"The request body exceeds {self.max_bytes} bytes.")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.strip().isdigit() or int(declared) > limit):
            exc = self._too_large() if declared.strip().isdigit() else StarletteHTTPException(400, "bad Content-Length")
            await error_response(_http_api_error(exc))(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self._too_large()
            return message

        await self.app(scope, counted, send)


def install(app: FastAPI, max_request_bytes: int) -> None:
    """The body limit and the handlers that turn every exception into an OpenAI-shaped error."""
    app.add_middleware(RequestBodyLimit, max_bytes=max_request_bytes)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            message = f"We could not parse the JSON body of your request: {first.get('msg')}"
            return error_response(APIError(400, message))
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = loc[0] if loc else None  # the request field at fault
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors
        )
        return error_response(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(_http_api_error(exc), exc.headers)  # e.g. Allow on a 405

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", "server_error"))
