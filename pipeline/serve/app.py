"""The HTTP layer: the FastAPI app (routes and middleware, built per ingress replica by :func:`create_app`) and the
``Ingress`` deployment that hosts it.

Routes only parse HTTP and return JSON or a stream; what they do is :class:`~pipeline.serve.serving.OpenAIServing`.
Every error is OpenAI-shaped (:mod:`pipeline.serve.errors`); the API key is checked from the headers, before
the body is read (:mod:`pipeline.serve.auth`); every response is counted for ``GET /metrics``
(:mod:`pipeline.serve.metrics`). The app is built when a replica starts, from that replica's settings, so nothing
about one deployment lives in module state.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse
from ray import serve

from pipeline.serve import errors
from pipeline.serve.auth import PUBLIC_PATHS, APIKeyAuth
from pipeline.serve.errors import GENERATE_ERRORS, JSONResponse, documented
from pipeline.serve.metrics import CONTENT_TYPE, RequestCounter
from pipeline.serve.protocol import (
    ChatCompletionResponse,
    ChatRequest,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    Health,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from pipeline.serve.serving import OpenAIServing, ServingSettings


def _respond(result: Any, headers: dict[str, str]) -> JSONResponse | StreamingResponse:
    if hasattr(result, "model_dump"):
        return JSONResponse(result.model_dump(), headers=headers)
    return StreamingResponse(result, media_type="text/event-stream", headers=headers)


def create_app(serving: OpenAIServing) -> FastAPI:
    """The OpenAI-compatible API over ``serving``: /health, /v1/models, /v1/completions, /v1/chat/completions,
    vLLM's /tokenize, /detokenize and /tokenizer_info, and Prometheus metrics at /metrics."""
    app = FastAPI(
        title="raygpt",
        description="OpenAI-compatible completions served by raygpt on Ray Serve.",
        version="0.1.0",
        default_response_class=JSONResponse,
    )
    errors.install(app, serving.settings.max_request_bytes)
    if serving.settings.api_key is not None:  # added after the body limit, so it runs first: before it reads a byte
        public = PUBLIC_PATHS | {"/metrics"} if serving.settings.metrics_public else PUBLIC_PATHS
        app.add_middleware(APIKeyAuth, api_key=serving.settings.api_key, public_paths=public)

    @app.get("/health", response_model=Health, responses=documented(405, 413))
    async def health() -> dict[str, str]:
        """Liveness of the HTTP layer (no authentication)."""
        return Health().model_dump()

    @app.get("/v1/models", response_model=ModelList, responses=documented(401, 405, 413))
    async def models() -> dict[str, Any]:
        return serving.models().model_dump()

    # vLLM's tokenizer routes at the server root: harnesses (lm-eval's remote tokenizer) find them there.
    @app.get("/tokenizer_info", response_model=TokenizerInfo, responses=documented(401, 405, 413))
    async def tokenizer_info() -> dict[str, Any]:
        return serving.tokenizer_info().model_dump()

    @app.post("/tokenize", response_model=TokenizeResponse, responses=documented(400, 401, 404, 405, 413))
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return (await serving.tokenize(body)).model_dump()

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=documented(400, 401, 404, 405, 413))
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return serving.detokenize(body).model_dump()

    @app.post(
        "/v1/completions",
        response_model=None,
        responses=documented(*GENERATE_ERRORS, stream=True, model=CompletionResponse),
    )
    async def completions(body: CompletionRequest) -> JSONResponse | StreamingResponse:
        return _respond(*await serving.completions(body))

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses=documented(*GENERATE_ERRORS, stream=True, model=ChatCompletionResponse),
    )
    async def chat_completions(body: ChatRequest) -> JSONResponse | StreamingResponse:
        return _respond(*await serving.chat_completions(body))

    # Not in the OpenAPI spec (as vLLM's): it answers Prometheus's text format, not the API's JSON.
    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        """Prometheus text exposition: the ingress's request, token and latency figures, and the engine gauges of
        every Generator replica (asked on each scrape)."""
        return Response(await serving.metrics.scrape(serving.generator), media_type=CONTENT_TYPE)

    # Added last, so it runs first: it sees every response, the auth check's 401s and the body limit's 413s too.
    routes = frozenset(route.path for route in app.routes if hasattr(route, "path"))
    app.add_middleware(RequestCounter, metrics=serving.metrics, routes=routes)
    return app


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """OpenAI HTTP API in front of the Generator replicas. ``settings`` were read from the export's config.json on
    the driver: the ingress never touches the export, so it starts fast and may run on any node."""

    def __init__(self, generator: Any, settings: ServingSettings) -> None:
        self.serving = OpenAIServing(generator, settings)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.serving)
