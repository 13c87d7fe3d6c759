"""API-key authentication as ASGI middleware: a request is judged from its headers, before any of its body is read.

With ``serve.api_key`` (or ``$RAYGPT_API_KEY``) set, every route except the public ones (liveness and the API
spec; ``/metrics`` too with ``serve.metrics_public``) needs ``Authorization: Bearer <key>``. A caller without the
key gets a 401 in OpenAI's shape at once: it cannot make the ingress read, buffer or parse a body (chunked or not),
nor learn which routes exist.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.serve.errors import APIError, error_response

PUBLIC_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


def invalid_api_key() -> APIError:
    return APIError(
        401,
        "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
        "authentication_error",
        code="invalid_api_key",
    )


def authorized(authorization: str, api_key: str) -> bool:
    """Whether an ``Authorization`` header value carries ``api_key`` (scheme case-blind, constant-time compare)."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class APIKeyAuth:
    """Refuse requests without the key before the app (and its body handling) sees them."""

    def __init__(self, app: ASGIApp, api_key: str, public_paths: frozenset[str] = PUBLIC_PATHS) -> None:
        self.app = app
        self.api_key = api_key
        self.public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "") in self.public_paths:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if not authorized(header, self.api_key):
            await error_response(invalid_api_key())(scope, receive, send)
            return
        await self.app(scope, receive, send)
