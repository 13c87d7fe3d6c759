"""The Serve stage: an OpenAI-compatible HTTP endpoint on Ray Serve replicas of an export.

Two deployments form the application ``raygpt``:

* ``Ingress`` (FastAPI, 0 CPUs): authentication, request validation, tokenization, the context-length check,
  OpenAI response shapes and server-sent events. Every error a client can cause is answered in OpenAI's shape
  ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.
* ``Generator`` (``serve.num_replicas`` or ``serve.autoscaling`` replicas): loads the export (local path or URI)
  and runs ``pipeline.generate.Engine`` in a background loop: token-level continuous batching, where new
  requests join the running batch at the next step and finished ones leave it at once.

Backpressure: each Generator replica takes ``max_ongoing_requests`` requests at a time; up to
``max_queued_requests`` more wait in the ingress's handle queue; beyond that the ingress answers 503 at once.
Deploying again with another export rolls the Generator replicas over (new ones start before old ones stop,
old ones finish their requests), so clients see no failed requests.
"""

import asyncio
import hmac
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse as _JSONResponse
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.config import ServeSection

APP_NAME = "raygpt"
API_KEY_ENV = "RAYGPT_API_KEY"
MAX_N = 16
MAX_SEQUENCES = 64  # prompts x n per request
MAX_STOP = 4
CHAT_STOP = "\nUser:"


# ---------------------------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = Field(None, description="Model id; must be the served one (GET /v1/models). Optional.")
    max_tokens: int | None = Field(16, ge=0, description="Tokens to generate (prompt + max_tokens <= context).")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="raygpt extension: sample from the k most likely tokens (0/-1: off).")
    n: int = Field(1, ge=1, le=MAX_N, description="Choices per prompt.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP} stop strings (not in the output).")
    seed: int | None = Field(None, description="Reproducible sampling; choice i uses seed + i.")
    user: str | None = Field(None, description="Accepted and ignored.")
    presence_penalty: float = Field(0.0, description="Only 0 is supported.")
    frequency_penalty: float = Field(0.0, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Only empty is supported.")


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions`` (OpenAI legacy completions)."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        "", description="A string, a list of strings, a list of token ids or a list of token-id lists."
    )
    logprobs: int | None = Field(None, ge=0, le=5, description="Log-probabilities of the top N alternatives.")
    echo: bool = Field(False, description="Prepend the prompt to the completion.")
    best_of: int | None = Field(None, description="Only null or equal to n is supported.")
    suffix: str | None = Field(None, description="Not supported (must be null).")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_SamplingFields):
    """``POST /v1/chat/completions``: messages are rendered with ``chat_template`` (plain text, see README)."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = Field(False, description="Not supported (must be false).")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error a client can cause, in OpenAI's shape (documented in the OpenAPI spec, checked by fuzzing)."""

    error: ErrorDetail


def _documented(*statuses: int, stream: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of a route: its error statuses and, for generating routes, the SSE stream."""
    responses: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse} for status in statuses}
    if stream:
        event = {"type": "string", "description": "A JSON chunk (or an error), then [DONE]."}
        sse = {"schema": {"type": "object", "required": ["data"], "properties": {"data": event}}}  # each event
        responses[200] = {
            "description": "JSON, or server-sent events with stream",
            "content": {"text/event-stream": sse},
        }
    return responses


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


def error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class JSONResponse(_JSONResponse):
    """JSON with non-ASCII escaped. A client may send a lone surrogate (``"\\ud800"`` is valid JSON) that comes back
    in a model id, an echoed prompt or an error message; Starlette's UTF-8 rendering raises on it (a 500), while
    ``\\uXXXX`` escapes represent any Python string, exactly as the client sent it."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _error_response(exc: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    if exc.status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status, headers=headers)


def chat_template(messages: list[ChatMessage]) -> str:
    """``System: ...`` / ``User: ...`` / ``Assistant: ...`` lines, ending with ``Assistant:`` for the reply."""
    lines = [f"{m.role.capitalize()}: {m.content}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def merge_delta(choice: dict[str, Any], delta: dict[str, Any]) -> None:
    """Append a Generator delta ``{"text", "logprobs", "finish_reason", "completion_tokens"}`` to ``choice``."""
    choice["text"] += delta["text"]
    if delta["logprobs"] is not None:
        if choice["logprobs"] is None:
            choice["logprobs"] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for key, values in delta["logprobs"].items():
            choice["logprobs"][key] += values
    choice["finish_reason"] = delta["finish_reason"]
    choice["completion_tokens"] = delta["completion_tokens"]


def new_choice() -> dict[str, Any]:
    return {"text": "", "logprobs": None, "finish_reason": None, "completion_tokens": 0}


# ---------------------------------------------------------------------------------------------- FastAPI app

app = FastAPI(
    title="raygpt",
    description="OpenAI-compatible completions served by raygpt on Ray Serve.",
    version="0.1.0",
    default_response_class=JSONResponse,
)


class RequestBodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 in OpenAI's shape before it is parsed.

    A declared ``Content-Length`` over the limit is refused without reading the body; a chunked body is counted as
    it arrives and refused once past the limit (FastAPI re-raises HTTP exceptions raised while it reads the body).
    Without it, a 100 MB prompt was read, parsed and tokenized by the ingress (over a minute of its event loop).
    ``max_bytes`` is set per process by ``Ingress.__init__`` (one ingress per replica process): Serve freezes the
    FastAPI app, middleware included, when the deployment is defined, before any config is known.
    """

    max_bytes: int = ServeSection.model_fields["max_request_bytes"].default  # until Ingress.__init__ sets it

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

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
            await _error_response(_http_api_error(exc))(scope, receive, send)
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


app.add_middleware(RequestBodyLimit)  # before @serve.ingress(app) below freezes the app


@app.exception_handler(APIError)
async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    return _error_response(exc)


@app.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return _error_response(APIError(400, f"We could not parse the JSON body of your request: {first.get('msg')}"))
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = loc[0] if loc else None  # the request field at fault
    message = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors)
    return _error_response(APIError(400, message, param=param, code="invalid_value"))


def _http_api_error(exc: StarletteHTTPException) -> APIError:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    code = "request_too_large" if exc.status_code == 413 else None
    return APIError(exc.status_code, str(exc.detail), kind, code=code)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error_response(_http_api_error(exc), exc.headers)  # e.g. Allow on a 405


@app.exception_handler(Exception)
async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
    return _error_response(APIError(500, f"internal error: {type(exc).__name__}", "server_error"))


# ---------------------------------------------------------------------------------------------- deployments


@serve.deployment(name="Generator")
class Generator:
    """One export, one ``Engine``; ``generate`` streams per-step deltas of the sequences it was given."""

    def __init__(
        self,
        export: str,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01,
        num_threads: int = 1,
        device: str = "cpu",
        tokenizer_file: str | None = None,
    ) -> None:
        import torch

        from pipeline.generate import Engine

        torch.set_num_threads(max(1, num_threads))
        self.engine, self.info = Engine.from_export(
            export,
            max_batch_size=max_batch_size,
            device=device,
            dtype=torch.bfloat16 if device.startswith("cuda") else None,  # fp32 on CPUs (bf16 matmuls are slow)
            tokenizer_file=tokenizer_file,
        )
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raygpt-engine")
        self._queues: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def _ensure_loop(self) -> asyncio.Event:
        if self._wake is None or self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self._wake

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self.engine.has_work():
                self._wake.clear()
                await self._wake.wait()
                if self.batch_wait_timeout_s > 0:
                    await asyncio.sleep(self.batch_wait_timeout_s)  # let concurrent arrivals share the prefill
            try:
                deltas = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception as exc:  # fail the requests in flight, keep serving
                for seq_id in self.engine.reset():
                    queue = self._queues.get(seq_id)
                    if queue is not None:
                        queue.put_nowait({"seq_id": seq_id, "error": f"{type(exc).__name__}: {exc}"})
                continue
            for delta in deltas:
                queue = self._queues.get(delta.seq_id)
                if queue is not None:
                    queue.put_nowait(
                        {
                            "seq_id": delta.seq_id,
                            "text": delta.text,
                            "logprobs": delta.logprobs.to_dict() if delta.logprobs is not None else None,
                            "finish_reason": delta.finish_reason,
                            "completion_tokens": delta.completion_tokens,
                        }
                    )

    def stats(self) -> dict[str, Any]:
        """Sequences running and waiting in this replica's engine, and requests attached to it."""
        return {"running": self.engine.num_running, "waiting": self.engine.num_waiting, "attached": len(self._queues)}

    def check_health(self) -> None:
        if self._task is not None and self._task.done() and not self._task.cancelled():
            raise RuntimeError(f"the generation loop died: {self._task.exception()!r}")

    async def generate(self, job: dict[str, Any]) -> AsyncIterator[list[tuple[int, dict[str, Any]]] | dict[str, Any]]:
        """``job``: {"sequences": [{"prompt_ids", "prompt_text", "params"}]}. Yields a meta dict first, then
        lists of ``(sequence index, delta)`` until every sequence finished."""
        from pipeline.generate import SamplingParams

        yield {"replica": self.replica, "export_sha256": self.info.weights_sha256, "export": self.info.location}
        wake = self._ensure_loop()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        index: dict[int, int] = {}
        try:
            for i, seq in enumerate(job["sequences"]):
                seq_id = self.engine.add(seq["prompt_ids"], SamplingParams(**seq["params"]), seq.get("prompt_text"))
                index[seq_id] = i
                self._queues[seq_id] = queue
            wake.set()
            remaining = len(index)
            stream = job.get("stream", True)  # else one message at the end: far less per-token overhead
            merged = [new_choice() for _ in index]
            while remaining:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                out = []
                for item in items:
                    if "error" in item:
                        raise RuntimeError(item["error"])
                    if item["finish_reason"] is not None:
                        remaining -= 1
                    if stream:
                        out.append((index[item["seq_id"]], item))
                    else:
                        merge_delta(merged[index[item["seq_id"]]], item)
                if out:
                    yield out
            if not stream:
                yield list(enumerate(merged))
        finally:
            for seq_id in index:
                if self._queues.pop(seq_id, None) is not None:
                    self.engine.abort(seq_id)  # a no-op for finished sequences


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """OpenAI HTTP API in front of the Generator replicas."""

    def __init__(self, generator: Any, settings: dict[str, Any]) -> None:
        """``settings`` come from ``build_app``, which read the export's config.json on the driver: the ingress
        never touches the export (nor imports torch), so it starts fast and may run on any node."""
        from pipeline.tokenizer import get_tokenizer

        self.generator = generator
        self.model_name: str = settings["model_name"]
        self.api_key: str | None = settings.get("api_key") or None
        self.request_timeout_s: float = settings["request_timeout_s"]
        self.export: str = settings["export"]
        self.context_length: int = settings["context_length"]
        self.vocab_size: int = settings["vocab_size"]
        self.tokenizer = get_tokenizer(settings["tokenizer"], settings.get("tokenizer_file"))
        # No token is longer than this many bytes (so characters): a longer prompt cannot fit the context, and is
        # refused before tokenizing it (BPE on megabytes of one repeated character takes seconds of the event loop).
        longest_token = max(len(b) for b in self.tokenizer.encoding.token_byte_values())
        self.max_prompt_chars = longest_token * self.context_length
        RequestBodyLimit.max_bytes = settings["max_request_bytes"]
        self.created = int(time.time())

    # ------------------------------------------------------------------------------------------ helpers

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                "authentication_error",
                code="invalid_api_key",
            )

    def _encode(self, text: str) -> list[int]:
        if len(text) > self.max_prompt_chars:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context_length} tokens, however your prompt has "
                f"{len(text)} characters (over {self.context_length} tokens). Please reduce your prompt.",
                param="prompt",
                code="context_length_exceeded",
            )
        return self.tokenizer.encode(text)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server has '{self.model_name}' (GET /v1/models).",
                "not_found_error",
                "model",
                "model_not_found",
            )

    def _common_params(self, body: _SamplingFields) -> dict[str, Any]:
        if body.presence_penalty != 0 or body.frequency_penalty != 0:
            param = "presence_penalty" if body.presence_penalty != 0 else "frequency_penalty"
            raise APIError(400, f"{param} is not supported (only 0)", param=param, code="unsupported_parameter")
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise APIError(400, f"stop takes up to {MAX_STOP} non-empty strings", param="stop", code="invalid_value")
        return {
            "max_tokens": 16 if body.max_tokens is None else body.max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": max(0, body.top_k),
            "stop": tuple(stop),
        }

    def _sequences(
        self, prompts: list[tuple[list[int], str | None]], params: dict[str, Any], n: int, seed: int | None
    ) -> list[dict[str, Any]]:
        if len(prompts) * n > MAX_SEQUENCES:
            raise APIError(400, f"at most {MAX_SEQUENCES} completions per request (prompts x n)", param="n")
        sequences = []
        for ids, text in prompts:
            if len(ids) + params["max_tokens"] > self.context_length:
                raise APIError(
                    400,
                    f"This model's maximum context length is {self.context_length} tokens, however you requested "
                    f"{len(ids) + params['max_tokens']} tokens ({len(ids)} in your prompt; {params['max_tokens']} "
                    "for the completion). Please reduce your prompt or completion length.",
                    param="prompt",
                    code="context_length_exceeded",
                )
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise APIError(400, f"token ids must be in [0, {self.vocab_size})", param="prompt")
            for _ in range(n):
                choice_seed = None if seed is None else seed + len(sequences)
                sequences.append({"prompt_ids": ids, "prompt_text": text, "params": {**params, "seed": choice_seed}})
        return sequences

    async def _start(self, sequences: list[dict[str, Any]], streaming: bool) -> tuple[Any, dict[str, Any]]:
        """Send the job; returns the response stream and its meta item. Queue full -> 503."""
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        job = {"sequences": sequences, "stream": streaming}
        stream = self.generator.options(stream=True).generate.remote(job)
        try:
            meta = await asyncio.wait_for(stream.__anext__(), timeout=self.request_timeout_s)
        except BackPressureError as exc:
            raise APIError(
                503, f"The server is overloaded, retry later ({exc}).", "server_overloaded", code="overloaded"
            ) from None
        except DeploymentUnavailableError as exc:
            raise APIError(503, f"The model is unavailable: {exc}", "server_overloaded", code="unavailable") from None
        except TimeoutError:
            stream.cancel()
            raise APIError(504, "Timed out waiting for a model replica.", "timeout", code="timeout") from None
        except RayActorError as exc:
            raise self._replica_failed(exc) from None
        return stream, meta

    @staticmethod
    def _replica_failed(exc: Exception) -> APIError:
        """A replica that died (killed, OOM, node lost) fails only the requests it was running: a short 503 (Ray's
        death report names pids, IPs and actor ids; that stays in the logs). Serve replaces the replica."""
        return APIError(
            503,
            f"The model replica serving this request failed ({type(exc).__name__}); retry the request.",
            "server_error",
            code="replica_failed",
        )

    def _headers(self, meta: dict[str, Any]) -> dict[str, str]:
        return {"x-raygpt-replica": str(meta["replica"]), "x-raygpt-export-sha256": str(meta["export_sha256"])}

    async def _collect(self, stream: Any, count: int) -> list[dict[str, Any]]:
        choices = [new_choice() for _ in range(count)]
        try:
            async with asyncio.timeout(self.request_timeout_s):
                async for items in stream:
                    for i, delta in items:
                        merge_delta(choices[i], delta)
        except TimeoutError:
            stream.cancel()
            raise APIError(504, f"Request exceeded {self.request_timeout_s} s.", "timeout", code="timeout") from None
        except asyncio.CancelledError:  # the client went away: stop generating for it
            stream.cancel()
            raise
        except RayActorError as exc:
            raise self._replica_failed(exc) from None
        return choices

    async def _events(
        self, stream: Any, chunk: Callable[[int, dict[str, Any]], dict[str, Any] | None], final: Any = None
    ) -> AsyncIterator[str]:
        """SSE lines for each delta, optionally a usage chunk, then [DONE]; timeouts end with an error event."""
        try:
            async with asyncio.timeout(self.request_timeout_s):
                async for items in stream:
                    for i, delta in items:
                        payload = chunk(i, delta)
                        if payload is not None:
                            yield f"data: {json.dumps(payload)}\n\n"
        except TimeoutError:
            stream.cancel()
            body = error_body(f"Request exceeded {self.request_timeout_s} s.", "timeout", code="timeout")
            yield f"data: {json.dumps(body)}\n\n"
        except asyncio.CancelledError:  # the client went away
            stream.cancel()
            raise
        except RayActorError as exc:
            failed = self._replica_failed(exc)
            yield f"data: {json.dumps(error_body(failed.message, failed.type, code=failed.code))}\n\n"
        except Exception as exc:  # the message's first line only: no tracebacks or internals in the stream
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            yield f"data: {json.dumps(error_body(f'generation failed: {first_line}', 'server_error'))}\n\n"
        if final is not None:
            yield f"data: {json.dumps(final())}\n\n"
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------------------------------ routes

    @app.get("/health", responses=_documented(405, 413))
    async def health(self) -> dict[str, str]:
        """Liveness of the HTTP layer (no authentication)."""
        return {"status": "ok"}

    @app.get("/v1/models", responses=_documented(401, 405, 413))
    async def models(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "raygpt",
                    "root": self.export,
                    "max_model_len": self.context_length,
                }
            ],
        }

    @app.post("/v1/completions", response_model=None, responses=_documented(*GENERATE_ERRORS, stream=True))
    async def completions(self, body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        self._auth(request)
        self._check_model(body.model)
        params = self._common_params(body)
        if body.suffix is not None:
            raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_parameter")
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of is not supported (only equal to n)", param="best_of")
        params.update(logprobs=body.logprobs, echo=body.echo)
        prompts = self._prompts(body.prompt)
        sequences = self._sequences(prompts, params, body.n, body.seed)
        stream, meta = await self._start(sequences, body.stream)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        prompt_tokens = sum(len(ids) for ids, _ in prompts)

        if not body.stream:
            choices = await self._collect(stream, len(sequences))
            completion_tokens = sum(c.pop("completion_tokens") for c in choices)
            for i, c in enumerate(choices):
                c["index"] = i
            result = {
                **base,
                "choices": [{k: c[k] for k in ("text", "index", "logprobs", "finish_reason")} for c in choices],
                "usage": self._usage(prompt_tokens, completion_tokens),
            }
            return JSONResponse(result, headers=self._headers(meta))

        totals = [0] * len(sequences)

        def chunk(i: int, delta: dict[str, Any]) -> dict[str, Any] | None:
            totals[i] = delta["completion_tokens"]
            if not delta["text"] and delta["finish_reason"] is None and not (delta["logprobs"] or {}).get("tokens"):
                return None
            choice = {"text": delta["text"], "index": i, "logprobs": delta["logprobs"]}
            choice["finish_reason"] = delta["finish_reason"]
            return {**base, "choices": [choice]}

        def final() -> dict[str, Any]:
            return {**base, "choices": [], "usage": self._usage(prompt_tokens, sum(totals))}

        usage = body.stream_options is not None and body.stream_options.include_usage
        events = self._events(stream, chunk, final if usage else None)
        return StreamingResponse(events, media_type="text/event-stream", headers=self._headers(meta))

    @app.post("/v1/chat/completions", response_model=None, responses=_documented(*GENERATE_ERRORS, stream=True))
    async def chat_completions(self, body: ChatRequest, request: Request) -> JSONResponse | StreamingResponse:
        self._auth(request)
        self._check_model(body.model)
        params = self._common_params(body)
        if body.logprobs:
            raise APIError(400, "logprobs is not supported for chat", param="logprobs", code="unsupported_parameter")
        params["stop"] = (*params["stop"], CHAT_STOP)[: MAX_STOP + 1]
        params.update(logprobs=None, echo=False)
        prompt = chat_template(body.messages)
        ids = self._encode(prompt)
        sequences = self._sequences([(ids, prompt)], params, body.n, body.seed)
        stream, meta = await self._start(sequences, body.stream)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": self.model_name}

        if not body.stream:
            choices = await self._collect(stream, len(sequences))
            completion_tokens = sum(c["completion_tokens"] for c in choices)
            result = {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": c["text"].lstrip()},
                        "logprobs": None,
                        "finish_reason": c["finish_reason"],
                    }
                    for i, c in enumerate(choices)
                ],
                "usage": self._usage(len(ids), completion_tokens),
            }
            return JSONResponse(result, headers=self._headers(meta))

        started: set[int] = set()
        spoke: set[int] = set()  # choices whose reply has begun (its leading whitespace is dropped)
        totals = [0] * len(sequences)

        def chunk(i: int, delta: dict[str, Any]) -> dict[str, Any] | None:
            totals[i] = delta["completion_tokens"]
            content: dict[str, Any] = {}
            if i not in started:
                started.add(i)
                content["role"] = "assistant"
            text = delta["text"] if i in spoke else delta["text"].lstrip()
            if text:
                spoke.add(i)
                content["content"] = text
            if not content and delta["finish_reason"] is None:
                return None
            choice = {"index": i, "delta": content, "logprobs": None, "finish_reason": delta["finish_reason"]}
            return {**base, "object": "chat.completion.chunk", "choices": [choice]}

        def final() -> dict[str, Any]:
            return {
                **base,
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": self._usage(len(ids), sum(totals)),
            }

        usage = body.stream_options is not None and body.stream_options.include_usage
        events = self._events(stream, chunk, final if usage else None)
        return StreamingResponse(events, media_type="text/event-stream", headers=self._headers(meta))

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def _prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[tuple[list[int], str | None]]:
        """(token ids, prompt text or None for token prompts) per prompt."""
        if isinstance(prompt, str):
            return [(self._encode(prompt), prompt)]
        if not prompt:
            raise APIError(400, "prompt must not be an empty list", param="prompt", code="invalid_value")
        if all(isinstance(p, str) for p in prompt):
            return [(self._encode(p), p) for p in prompt]  # type: ignore[arg-type]
        if all(isinstance(p, int) for p in prompt):
            return [(list(prompt), None)]  # type: ignore[arg-type]
        lists: list[tuple[list[int], str | None]] = []
        for p in prompt:
            if not isinstance(p, list) or not p:
                raise APIError(400, "token-id prompts must be non-empty lists of integers", param="prompt")
            lists.append((list(p), None))
        return lists


# ---------------------------------------------------------------------------------------------- deploy


def build_app(config: Any, export: str | None = None) -> Any:
    """The Serve application for ``config.serve`` (export: ``export`` or ``resolve_export(config)``)."""
    import math

    from pipeline.export import read_export_info
    from pipeline.generate import resolve_export

    s = config.serve
    location = resolve_export(config, export)
    info, _ = read_export_info(location)  # a missing or broken export fails here, not in replica restarts
    options: dict[str, Any] = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "ray_actor_options": {"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica},
        "max_surge_percent": 100,  # rolling updates start replacements before stopping old replicas
        "graceful_shutdown_timeout_s": s.request_timeout_s + 5,
        "graceful_shutdown_wait_loop_s": 0.5,
        "max_constructor_retry_count": 3,
        # A dead replica is noticed by its failed health check: every 2 s rather than Serve's 10 s, so a killed
        # replica is replaced within seconds (tests/test_faults.py measures it).
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 10.0,
    }
    if s.autoscaling is not None:
        options["autoscaling_config"] = {
            "min_replicas": s.autoscaling.min_replicas,
            "initial_replicas": max(1, s.autoscaling.min_replicas),
            "max_replicas": s.autoscaling.max_replicas,
            "target_ongoing_requests": s.autoscaling.target_ongoing_requests,
        }
        options["num_replicas"] = "auto"
    else:
        options["num_replicas"] = s.num_replicas
    generator = Generator.options(**options).bind(
        location,
        max_batch_size=s.max_batch_size,
        batch_wait_timeout_s=s.batch_wait_timeout_s,
        num_threads=max(1, math.ceil(s.num_cpus_per_replica)),
        device="cuda" if s.num_gpus_per_replica > 0 else "cpu",
        tokenizer_file=config.data.tokenizer_file,
    )
    api_key = s.api_key.get_secret_value() if s.api_key is not None else os.environ.get(API_KEY_ENV)
    settings = {
        "model_name": s.model_name,
        "api_key": api_key or None,
        "request_timeout_s": s.request_timeout_s,
        "max_request_bytes": s.max_request_bytes,
        "export": location,
        "context_length": info.model.context_length,
        "vocab_size": info.model.vocab_size,
        "tokenizer": info.tokenizer.get("name", "r50k_base"),
        "tokenizer_file": config.data.tokenizer_file,
    }
    ingress = Ingress.options(
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10_000,
        max_surge_percent=100,
        graceful_shutdown_timeout_s=s.request_timeout_s + 5,
        graceful_shutdown_wait_loop_s=0.5,
        max_constructor_retry_count=3,
    ).bind(generator, settings)
    return ingress


def base_url(config: Any) -> str:
    host = config.serve.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.serve.port}"


def http_options(config: Any) -> dict[str, Any]:
    """Serve's HTTP proxy settings: ``serve.host`` (127.0.0.1 unless configured: Ray Serve's own default would be
    127.0.0.1 too, but it is never left implicit) and ``serve.port``."""
    return {
        "host": config.serve.host,
        "port": config.serve.port,
        "request_timeout_s": config.serve.request_timeout_s + 10,
    }


def deploy(config: Any, export: str | None = None, blocking: bool = False) -> str:
    """Start (or update in place: a rolling update) the ``raygpt`` Serve application; returns the base URL.

    Joins ``run.ray_address`` or starts a local Ray, starts Serve's HTTP proxy on ``serve.host:serve.port``
    (fixed for the life of the Ray cluster's Serve instance), and waits until the replicas are up. With
    ``blocking`` it then serves until Ctrl-C and shuts the application down.
    """
    from pipeline.generate import resolve_export
    from pipeline.raycluster import connect

    location = resolve_export(config, export)
    app = build_app(config, location)
    connect(config.run)
    serve.start(http_options=http_options(config))
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    url = base_url(config)
    if blocking:
        serve_forever()
    return url


def serve_forever(poll_s: float = 1.0) -> None:
    """Block until Ctrl-C, then delete the application and stop Serve."""
    try:
        while True:
            time.sleep(poll_s)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()


def shutdown() -> None:
    """Delete the ``raygpt`` application and stop Serve (the Ray cluster itself keeps running). Safe to call
    twice or when Serve is not running."""
    from ray.serve.exceptions import RayServeException

    try:
        serve.delete(APP_NAME)
    except RayServeException:  # no Serve instance running
        return
    serve.shutdown()


def curl_example(config: Any, url: str | None = None) -> str:
    """A ready-to-paste curl command for the endpoint."""
    url = url or base_url(config)
    body = json.dumps({"model": config.serve.model_name, "prompt": "ROMEO:", "max_tokens": 32, "temperature": 0.8})
    auth = ""
    if config.serve.api_key is not None or os.environ.get(API_KEY_ENV):
        auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"'
    return f"curl -s {url}/v1/completions -H 'Content-Type: application/json'{auth} -d '{body}'"
