"""What the engine returns: per-step :class:`Delta` of a sequence (also what a replica streams to the ingress),
and the whole :class:`Completion` of offline generation. Plain dataclasses: they cross the Ray boundary as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length"]


@dataclass
class Logprobs:
    """OpenAI legacy-completions logprobs; ``text_offset`` indexes the returned ``text`` of the choice."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def extend(self, other: Logprobs) -> None:
        self.tokens += other.tokens
        self.token_logprobs += other.token_logprobs
        self.top_logprobs += other.top_logprobs
        self.text_offset += other.text_offset

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


@dataclass
class Delta:
    """New output of one sequence after a step (text and tokens are only ever appended)."""

    seq_id: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: Logprobs | None = None
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0  # generated so far, including tokens cut by a stop string and <|endoftext|>

    def merge(self, later: Delta) -> None:
        self.text += later.text
        self.token_ids += later.token_ids
        if later.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = Logprobs()
            self.logprobs.extend(later.logprobs)
        self.finish_reason = later.finish_reason
        self.completion_tokens = later.completion_tokens


@dataclass
class Completion:
    """One finished sequence of :meth:`Engine.generate`."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: Logprobs | None = None
