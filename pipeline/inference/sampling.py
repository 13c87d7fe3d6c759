"""What one sequence asks for (:class:`SamplingParams`), whether it fits the model, and how a token is drawn.

Sampling is per sequence: temperature (0 = greedy), top-k, top-p and a ``torch.Generator`` of its own, so a
seeded request draws the same tokens whatever else shares the batch (up to float rounding of batched matmuls).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 5


class ContextLengthError(ValueError):
    """The prompt plus ``max_tokens`` does not fit in the model's context."""

    code = "context_length_exceeded"


def prompt_length(prompt_ids: Sequence[int]) -> int:
    """Positions a prompt takes in the context: an empty prompt starts from ``<|endoftext|>`` (as GPT-2/3 do)."""
    return max(1, len(prompt_ids))


def check_context_length(prompt_ids: Sequence[int], max_tokens: int, context_length: int) -> None:
    """The one context-length rule: the prompt (:func:`prompt_length`) plus ``max_tokens`` must fit the context."""
    prompt_tokens = prompt_length(prompt_ids)
    if prompt_tokens + max_tokens > context_length:
        raise ContextLengthError(
            f"This model's maximum context length is {context_length} tokens, however you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in your prompt; {max_tokens} for the completion). "
            "Please reduce your prompt or completion length."
        )


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is generated (the OpenAI completion fields that shape sampling)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None: fresh randomness
    logprobs: int | None = None  # None: no logprobs; N: the sampled token's logprob plus the N most likely
    echo: bool = False  # prepend the prompt (and its logprobs) to the output
    stop_at_eot: bool = True  # <|endoftext|> ends the sequence

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from ``logits`` (V,): greedy at temperature 0, else temperature, top-k, top-p, then a draw from
    ``generator``."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    # in float64 (where every positive JSON number is non-zero) and shifted so the largest is 0 before dividing:
    # any temperature > 0, however small, then gives 0 for the top token and finite negatives or -inf for the
    # rest (never inf - inf = nan), and the softmax is unchanged by the shift
    logits = logits.double()
    logits = (logits - logits.max()) / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        drop = (torch.cumsum(sorted_probs, dim=0) - sorted_probs) > params.top_p  # keep the smallest nucleus
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    # inverse-CDF draw: one uniform per token (torch.multinomial is 10-100x slower on a 50k vocabulary)
    cdf = torch.cumsum(probs, dim=0, dtype=torch.float64)
    u = torch.rand(1, generator=generator, dtype=torch.float64) * cdf[-1]
    return int(torch.searchsorted(cdf, u, right=True).clamp(max=probs.numel() - 1))
