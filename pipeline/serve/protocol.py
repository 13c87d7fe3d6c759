"""The OpenAI wire format raygpt speaks: pydantic models of every request and response body.

Requests validate strictly (a wrong type is a 400 naming the field) and ignore unknown fields, as OpenAI does; a
request turns itself into the engine's :class:`~pipeline.inference.sampling.SamplingParams`
(:meth:`SamplingRequest.to_sampling_params`). Responses are models too, so the OpenAPI spec at ``/openapi.json``
describes exactly what the routes return.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from pipeline.inference.outputs import Logprobs
from pipeline.inference.sampling import SamplingParams
from pipeline.model.chat import CHAT_STOP, render

MAX_N = 16
MAX_SEQUENCES = 64  # prompts x n per request
MAX_STOP = 4


class ProtocolError(ValueError):
    """A request that validates as JSON but asks for something raygpt does not do; ``param`` names the field."""

    def __init__(self, message: str, param: str, code: str | None = "unsupported_parameter") -> None:
        super().__init__(message)
        self.param, self.code = param, code


# ---------------------------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields completions and chat share."""

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

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise ProtocolError(f"stop takes up to {MAX_STOP} non-empty strings", "stop", "invalid_value")
        return tuple(stop)

    def to_sampling_params(self) -> SamplingParams:
        """The engine's parameters for choice 0 (choice ``i`` of a seeded request uses ``seed + i``)."""
        if self.presence_penalty != 0 or self.frequency_penalty != 0:
            param = "presence_penalty" if self.presence_penalty != 0 else "frequency_penalty"
            raise ProtocolError(f"{param} is not supported (only 0)", param)
        if self.logit_bias:
            raise ProtocolError("logit_bias is not supported", "logit_bias")
        return SamplingParams(
            max_tokens=16 if self.max_tokens is None else self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(0, self.top_k),
            stop=self.stop_strings(),
            seed=self.seed,
        )


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions`` (OpenAI legacy completions)."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        "", description="A string, a list of strings, a list of token ids or a list of token-id lists."
    )
    logprobs: int | None = Field(None, ge=0, le=5, description="Log-probabilities of the top N alternatives.")
    echo: bool = Field(False, description="Prepend the prompt to the completion.")
    best_of: int | None = Field(None, description="Only null or equal to n is supported.")
    suffix: str | None = Field(None, description="Not supported (must be null).")

    def to_sampling_params(self) -> SamplingParams:
        base = super().to_sampling_params()
        if self.suffix is not None:
            raise ProtocolError("suffix is not supported", "suffix")
        if self.best_of not in (None, self.n):
            raise ProtocolError("best_of is not supported (only equal to n)", "best_of", code=None)
        return dataclasses.replace(base, logprobs=self.logprobs, echo=self.echo)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(SamplingRequest):
    """``POST /v1/chat/completions``: messages are rendered with :func:`chat_template` (plain text, see README)."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = Field(False, description="Not supported (must be false).")

    def to_sampling_params(self) -> SamplingParams:
        base = super().to_sampling_params()
        if self.logprobs:
            raise ProtocolError("logprobs is not supported for chat", "logprobs")
        return dataclasses.replace(base, stop=(*base.stop, CHAT_STOP)[: MAX_STOP + 1])

    def prompt(self) -> str:
        return chat_template(self.messages)


def chat_template(messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
    """The messages as prompt text (:mod:`pipeline.model.chat`)."""
    return render(((m.role, m.content) for m in messages), add_generation_prompt)


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (vLLM's): a prompt, or chat messages rendered as the chat route renders them."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = Field(True, description="Accepted; r50k adds no BOS/EOS either way (as GPT-2).")
    add_generation_prompt: bool = Field(True, description="With messages: end with 'Assistant:'.")
    return_token_strs: bool = False

    def text(self) -> str:
        if (self.prompt is None) == (self.messages is None):
            raise ProtocolError("give exactly one of prompt and messages", "prompt", "invalid_value")
        if self.messages is not None:
            return chat_template(self.messages, self.add_generation_prompt)
        assert self.prompt is not None
        return self.prompt


class DetokenizeRequest(BaseModel):
    """``POST /detokenize`` (vLLM's)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------------------------------------- responses


class Body(BaseModel):
    """A response body; the fields named in ``omit_if_none`` are left out rather than sent as null."""

    omit_if_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit(self, handler: Any):  # no return type: the JSON schema stays that of the fields
        data = handler(self)
        return {k: v for k, v in data.items() if not (k in self.omit_if_none and v is None)}


class Usage(Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionLogprobs(Body):
    """Legacy-completions logprobs; ``text_offset`` indexes the choice's ``text``."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]

    @classmethod
    def of(cls, logprobs: Logprobs | None) -> CompletionLogprobs | None:
        if logprobs is None:
            return None
        return cls(
            tokens=logprobs.tokens,
            token_logprobs=logprobs.token_logprobs,
            top_logprobs=logprobs.top_logprobs,
            text_offset=logprobs.text_offset,
        )


class CompletionChoice(Body):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class Generated(Body):
    """What every generation response (or chunk of a stream) starts with; ``usage`` is left out of stream chunks
    but the last one (with ``stream_options.include_usage``)."""

    omit_if_none = ("usage",)
    key_order: ClassVar[tuple[str, ...]] = ("id", "object", "created", "model", "choices", "usage")  # OpenAI's

    id: str
    created: int
    model: str
    usage: Usage | None = None

    @model_serializer(mode="wrap")
    def _ordered(self, handler: Any):  # no return type (see Body._omit)
        data = Body._omit(self, handler)
        return {key: data[key] for key in self.key_order if key in data}


class CompletionResponse(Generated):
    """A completion, or with ``stream`` one server-sent chunk of it."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class AssistantMessage(Body):
    role: Literal["assistant"] = "assistant"
    content: str


class _ChatChoiceBase(Body):
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatChoice(_ChatChoiceBase):
    message: AssistantMessage


class ChatCompletionResponse(Generated):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatDelta(Body):
    """What a chunk adds to the reply: the role in a choice's first chunk, then content."""

    omit_if_none = ("role", "content")

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_ChatChoiceBase):
    delta: ChatDelta


class ChatCompletionChunk(Generated):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class ModelCard(Body):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "raygpt"
    root: str
    max_model_len: int


class ModelList(Body):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(Body):
    status: Literal["ok"] = "ok"


class TokenizeResponse(Body):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(Body):
    prompt: str


class TokenizerInfo(Body):
    """``GET /tokenizer_info`` (vLLM's): what a client needs to tokenize as the server does (lm-eval's remote
    tokenizer reads ``eos_token`` and ``chat_template`` from it)."""

    tokenizer_class: str = "GPT2TokenizerFast"
    encoding: str
    eos_token: str
    bos_token: str
    unk_token: str
    pad_token: str | None = None
    add_bos_token: bool = False
    add_prefix_space: bool = False
    model_max_length: int
    vocab_size: int
    chat_template: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error a client can cause, in OpenAI's shape (documented in the OpenAPI spec, checked by fuzzing)."""

    error: ErrorDetail
