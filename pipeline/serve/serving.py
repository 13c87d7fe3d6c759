"""What the OpenAI routes do, between the parsed request and the response body: prompts to token
ids, the per-request limits, sending sequences to a ``Generator`` replica and turning its deltas into OpenAI
responses or server-sent events, timing each generation request for :mod:`pipeline.serve.metrics` as it goes.

:class:`OpenAIServing` holds no HTTP machinery (the routes in :mod:`pipeline.serve.app` call it) and never touches
the export: what it needs of the model (context length, vocabulary, tokenizer) comes in :class:`ServingSettings`,
read once on the driver.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ray.exceptions import RayActorError

from pipeline.inference.outputs import Delta
from pipeline.inference.sampling import ContextLengthError, SamplingParams, check_context_length
from pipeline.model.chat import CHAT_TEMPLATE_JINJA
from pipeline.model.tokenizer import get_tokenizer
from pipeline.serve.errors import APIError, engine_failed, error_body, replica_failed
from pipeline.serve.metrics import RequestTimer, ServingMetrics
from pipeline.serve.protocol import (
    MAX_SEQUENCES,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatRequest,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    ProtocolError,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    Usage,
)
from pipeline.serve.replica import EngineFailure, ReplicaInfo, SequenceRequest

Prompt = tuple[list[int], str | None]  # token ids, and the text they came from (None for token prompts)


@dataclass(frozen=True)
class ServingSettings:
    """What the ingress needs to know, resolved on the driver from ``serve.*`` and the export's config.json."""

    model_name: str
    api_key: str | None
    request_timeout_s: float
    max_request_bytes: int
    context_length: int
    vocab_size: int
    tokenizer: str
    tokenizer_file: str | None
    metrics_public: bool = False
    replica_grpc: bool = True


class OpenAIServing:
    def __init__(self, generator: Any, settings: ServingSettings) -> None:
        self.generator = generator
        self.settings = settings
        self.model_name = settings.model_name
        self.request_timeout_s = settings.request_timeout_s
        self.context_length = settings.context_length
        self.tokenizer = get_tokenizer(settings.tokenizer, settings.tokenizer_file)
        # No token is longer than this many bytes (so characters): a longer prompt cannot fit the context, and is
        # refused before tokenizing it (BPE on megabytes of one repeated character takes seconds of the event loop).
        longest_token = max(len(b) for b in self.tokenizer.encoding.token_byte_values())
        self.max_prompt_chars = longest_token * self.context_length
        self.created = int(time.time())
        self.metrics = ServingMetrics()

    # ------------------------------------------------------------------------------------------ checks

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server has '{self.model_name}' (GET /v1/models).",
                "not_found_error",
                "model",
                "model_not_found",
            )

    def _params(self, body: SamplingRequest) -> SamplingParams:
        self._check_model(body.model)
        try:
            return body.to_sampling_params()
        except ProtocolError as exc:
            raise APIError(400, str(exc), param=exc.param, code=exc.code) from None

    def _check_prompt_chars(self, text: str) -> None:
        if len(text) > self.max_prompt_chars:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context_length} tokens, however your prompt has "
                f"{len(text)} characters (over {self.context_length} tokens). Please reduce your prompt.",
                param="prompt",
                code="context_length_exceeded",
            )

    def _check_prompts(self, prompt: str | list[str] | list[int] | list[list[int]], n: int) -> None:
        """The checks that need no tokenizer, all made before any prompt is tokenized: the prompt's shape, how many
        sequences it asks for, and each text's length in characters."""
        if isinstance(prompt, str):
            texts, count = [prompt], 1
        elif not prompt:
            raise APIError(400, "prompt must not be an empty list", param="prompt", code="invalid_value")
        elif all(isinstance(p, str) for p in prompt):
            texts, count = prompt, len(prompt)  # type: ignore[assignment]
        elif all(isinstance(p, int) for p in prompt):
            texts, count = [], 1
        else:
            if not all(isinstance(p, list) and p for p in prompt):
                raise APIError(400, "token-id prompts must be non-empty lists of integers", param="prompt")
            texts, count = [], len(prompt)
        if count * n > MAX_SEQUENCES:
            raise APIError(400, f"at most {MAX_SEQUENCES} completions per request (prompts x n)", param="n")
        for text in texts:
            self._check_prompt_chars(text)

    async def _encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of ``texts``, computed off the event loop (the BPE releases the GIL), so the ingress goes on
        answering other requests while a large one is tokenized."""
        return await asyncio.to_thread(lambda: [self.tokenizer.encode_with_special(text) for text in texts])

    async def prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
        """The request's prompts as (token ids, text); call after :meth:`_check_prompts`."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if all(isinstance(p, str) for p in prompt):
            texts: list[str] = list(prompt)  # type: ignore[arg-type]
            return list(zip(await self._encode(texts), texts, strict=True))
        if all(isinstance(p, int) for p in prompt):
            return [(list(prompt), None)]  # type: ignore[arg-type]
        return [(list(p), None) for p in prompt]  # type: ignore[arg-type]

    def _sequences(self, prompts: list[Prompt], params: SamplingParams, n: int) -> list[SequenceRequest]:
        sequences = []
        for ids, text in prompts:
            try:
                check_context_length(ids, params.max_tokens, self.context_length)
            except ContextLengthError as exc:
                raise APIError(400, str(exc), param="prompt", code=exc.code) from None
            if any(not 0 <= t < self.settings.vocab_size for t in ids):
                raise APIError(400, f"token ids must be in [0, {self.settings.vocab_size})", param="prompt")
            for _ in range(n):
                seed = None if params.seed is None else params.seed + len(sequences)
                sequences.append(SequenceRequest(ids, text, dataclasses.replace(params, seed=seed)))
        return sequences

    # ------------------------------------------------------------------------------------------ the replica

    async def _start(self, sequences: list[SequenceRequest], streaming: bool) -> tuple[Any, ReplicaInfo]:
        """Send the sequences; returns the response stream and its first item. Queue full -> 503."""
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        # by value (serve.replica_grpc): Serve's gRPC channel straight to the replica carries request and stream
        handle = self.generator.options(stream=True, _by_reference=not self.settings.replica_grpc)
        stream = handle.generate.remote(sequences, streaming)
        try:
            info = await asyncio.wait_for(stream.__anext__(), timeout=self.request_timeout_s)
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
            raise replica_failed(exc) from None
        except EngineFailure:  # a replica whose generation loop died refuses at once, until Serve replaces it
            raise engine_failed() from None
        return stream, info

    @staticmethod
    def headers(info: ReplicaInfo) -> dict[str, str]:
        return {"x-raygpt-replica": info.replica, "x-raygpt-export-sha256": info.export_sha256}

    async def _collect(self, stream: Any, count: int, timer: RequestTimer) -> list[Delta]:
        choices = [Delta(i) for i in range(count)]
        try:
            async with asyncio.timeout(self.request_timeout_s):
                async for items in stream:
                    if not items:  # the replica's notice of the request's first token
                        timer.first_token()
                    for i, delta in items:
                        choices[i].merge(delta)
                        timer.seen(i, delta)
        except TimeoutError:
            stream.cancel()
            raise APIError(504, f"Request exceeded {self.request_timeout_s} s.", "timeout", code="timeout") from None
        except asyncio.CancelledError:  # the client went away: stop generating for it
            stream.cancel()
            raise
        except RayActorError as exc:
            raise replica_failed(exc) from None
        except EngineFailure:  # Ray re-raises the replica's error as an instance of it
            raise engine_failed() from None
        timer.completed()
        return choices

    async def _events(
        self, stream: Any, chunk: Callable[[int, Delta], Any], final: Callable[[], Any] | None, timer: RequestTimer
    ) -> AsyncIterator[str]:
        """SSE lines for each delta, optionally a usage chunk, then [DONE]; timeouts end with an error event."""

        def event(body: Any) -> str:
            return f"data: {json.dumps(body)}\n\n"

        try:
            async with asyncio.timeout(self.request_timeout_s):
                async for items in stream:
                    for i, delta in items:
                        timer.seen(i, delta)
                        payload = chunk(i, delta)
                        if payload is not None:
                            yield event(payload.model_dump())
            timer.completed()
        except TimeoutError:
            stream.cancel()
            yield event(error_body(f"Request exceeded {self.request_timeout_s} s.", "timeout", code="timeout"))
        except asyncio.CancelledError:  # the client went away
            stream.cancel()
            raise
        except (RayActorError, EngineFailure) as exc:
            failed = replica_failed(exc) if isinstance(exc, RayActorError) else engine_failed()
            yield event(error_body(failed.message, failed.type, code=failed.code))
        except Exception as exc:  # the message's first line only: no tracebacks or internals in the stream
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            yield event(error_body(f"generation failed: {first_line}", "server_error"))
        if final is not None:
            yield event(final().model_dump())
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------------------------------ endpoints

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        """As the completions route reads a text prompt (special-token strings are those tokens), with no context
        limit: a harness tokenizes whole documents and windows them itself."""
        self._check_model(body.model)
        try:
            text = body.text()
        except ProtocolError as exc:
            raise APIError(400, str(exc), param=exc.param, code=exc.code) from None
        (ids,) = await self._encode([text])
        strs = [self.tokenizer.decode([t]) for t in ids] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.context_length, tokens=ids, token_strs=strs)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(body.model)
        if any(not 0 <= t < self.settings.vocab_size for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {self.settings.vocab_size})", param="tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))

    def tokenizer_info(self) -> TokenizerInfo:
        eot = self.tokenizer.decode([self.tokenizer.eot_id])
        return TokenizerInfo(
            encoding=self.tokenizer.name,
            eos_token=eot,
            bos_token=eot,
            unk_token=eot,
            model_max_length=self.context_length,
            vocab_size=self.settings.vocab_size,
            chat_template=CHAT_TEMPLATE_JINJA,
        )

    def models(self) -> ModelList:
        # the id and what a client needs (the context length), never where the weights are stored
        name = self.model_name
        card = ModelCard(id=name, created=self.created, root=name, max_model_len=self.context_length)
        return ModelList(data=[card])

    async def completions(self, body: CompletionRequest) -> tuple[Any, dict[str, str]]:
        """A :class:`CompletionResponse`, or an SSE line iterator when streaming; plus the response headers."""
        timer = self.metrics.timer()
        params = self._params(body)
        self._check_prompts(body.prompt, body.n)
        prompts = await self.prompts(body.prompt)
        sequences = self._sequences(prompts, params, body.n)
        stream, info = await self._start(sequences, body.stream)
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        timer.accepted(prompt_tokens)

        if not body.stream:
            outputs = await self._collect(stream, len(sequences), timer)
            choices = [
                CompletionChoice(
                    text=d.text, index=i, logprobs=CompletionLogprobs.of(d.logprobs), finish_reason=d.finish_reason
                )
                for i, d in enumerate(outputs)
            ]
            usage = Usage.of(prompt_tokens, sum(d.completion_tokens for d in outputs))
            return CompletionResponse(**base, choices=choices, usage=usage), self.headers(info)

        totals = [0] * len(sequences)

        def chunk(i: int, delta: Delta) -> CompletionResponse | None:
            totals[i] = delta.completion_tokens
            has_tokens = delta.logprobs is not None and delta.logprobs.tokens
            if not delta.text and delta.finish_reason is None and not has_tokens:
                return None
            logprobs = CompletionLogprobs.of(delta.logprobs)
            choice = CompletionChoice(text=delta.text, index=i, logprobs=logprobs, finish_reason=delta.finish_reason)
            return CompletionResponse(**base, choices=[choice])

        def final() -> CompletionResponse:
            return CompletionResponse(**base, choices=[], usage=Usage.of(prompt_tokens, sum(totals)))

        return self._events(stream, chunk, final if body.include_usage else None, timer), self.headers(info)

    async def chat_completions(self, body: ChatRequest) -> tuple[Any, dict[str, str]]:
        """A :class:`ChatCompletionResponse`, or an SSE line iterator when streaming; plus the response headers."""
        timer = self.metrics.timer()
        params = self._params(body)
        prompt = body.prompt()
        self._check_prompts(prompt, body.n)
        (ids,) = await self._encode([prompt])
        sequences = self._sequences([(ids, prompt)], params, body.n)
        stream, info = await self._start(sequences, body.stream)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        timer.accepted(len(ids))

        if not body.stream:
            outputs = await self._collect(stream, len(sequences), timer)
            choices = [
                ChatChoice(index=i, message=AssistantMessage(content=d.text.lstrip()), finish_reason=d.finish_reason)
                for i, d in enumerate(outputs)
            ]
            usage = Usage.of(len(ids), sum(d.completion_tokens for d in outputs))
            return ChatCompletionResponse(**base, choices=choices, usage=usage), self.headers(info)

        started: set[int] = set()
        spoke: set[int] = set()  # choices whose reply has begun (its leading whitespace is dropped)
        totals = [0] * len(sequences)

        def chunk(i: int, delta: Delta) -> ChatCompletionChunk | None:
            totals[i] = delta.completion_tokens
            content = ChatDelta()
            if i not in started:
                started.add(i)
                content.role = "assistant"
            text = delta.text if i in spoke else delta.text.lstrip()
            if text:
                spoke.add(i)
                content.content = text
            if content.role is None and content.content is None and delta.finish_reason is None:
                return None
            choice = ChatChunkChoice(index=i, delta=content, finish_reason=delta.finish_reason)
            return ChatCompletionChunk(**base, choices=[choice])

        def final() -> ChatCompletionChunk:
            return ChatCompletionChunk(**base, choices=[], usage=Usage.of(len(ids), sum(totals)))

        return self._events(stream, chunk, final if body.include_usage else None, timer), self.headers(info)
