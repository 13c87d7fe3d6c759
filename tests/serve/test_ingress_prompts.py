"""The ingress's prompt handling in-process (no replica involved): cheap checks come before tokenizing, and
tokenizing a large valid request leaves the event loop free for other requests."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pipeline.model.presets import PRESETS
from pipeline.serve.errors import APIError
from pipeline.serve.protocol import MAX_SEQUENCES, CompletionRequest
from pipeline.serve.serving import OpenAIServing, ServingSettings

NANO = PRESETS["nano"].model


def _serving(context_length: int = NANO.context_length) -> OpenAIServing:
    settings = ServingSettings(
        model_name="raygpt",
        api_key=None,
        request_timeout_s=30,
        max_request_bytes=64 * 2**20,
        context_length=context_length,
        vocab_size=NANO.vocab_size,
        tokenizer="r50k_base",
        tokenizer_file=None,
    )
    return OpenAIServing(generator=None, settings=settings)


class CountingTokenizer:
    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return self.inner.encode(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize(
    "request_body",
    [
        {"prompt": ["some text"] * (MAX_SEQUENCES + 1), "max_tokens": 1},  # too many prompts
        {"prompt": ["some text"] * 8, "n": MAX_SEQUENCES // 8 + 1, "max_tokens": 1},  # prompts x n
        {"prompt": ["fits"] * 3 + ["far too long " * 100_000], "max_tokens": 1},  # the last prompt cannot fit
    ],
)
def test_counts_and_sizes_are_checked_before_any_prompt_is_tokenized(request_body: dict[str, Any]) -> None:
    serving = _serving()
    counting = CountingTokenizer(serving.tokenizer)
    serving.tokenizer = counting  # type: ignore[assignment]
    with pytest.raises(APIError) as raised:
        asyncio.run(serving.completions(CompletionRequest.model_validate(request_body)))
    assert raised.value.status == 400
    assert counting.calls == 0


def test_tokenizing_a_large_request_does_not_block_the_event_loop() -> None:
    serving = _serving(context_length=2048)
    # 64 prompts of 40,000 characters: a good fraction of a second of BPE work on this machine.
    text = ("All the world's a stage, and all the men and women merely players. " * 600)[:40_000]
    prompts = [f"{i} {text}" for i in range(MAX_SEQUENCES)]

    async def main() -> tuple[int, int]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        start = ticks
        encoded = await serving.prompts(prompts)
        done.set()
        await task
        assert len(encoded) == MAX_SEQUENCES and all(ids for ids, _ in encoded)
        return start, ticks

    start, end = asyncio.run(main())
    assert end - start > 10, "the event loop did not run while the prompts were tokenized"
