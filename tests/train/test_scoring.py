"""Held-out exact-match scoring (no Ray): every example is scored, however long its prompt, on the prompt the
model was fine-tuned on (the data stage's truncation) with a completion budget of its own."""

from __future__ import annotations

from pipeline.data.finetune import encode_example
from pipeline.model.tokenizer import get_tokenizer

NANO_CONTEXT = 64
LONG_PROMPT = "Play: Hamlet\nLine: " + "To be, or not to be, that is the question; " * 30 + "\nSpeaker:"
EXAMPLES = [
    {"prompt": LONG_PROMPT, "completion": " Hamlet"},
    {"prompt": "Play: Macbeth\nLine: Out, damned spot!\nSpeaker:", "completion": " Lady Macbeth of Scotland"},
]


def test_prompt_longer_than_the_context_is_scored(exports: dict[str, str]) -> None:
    from pipeline.train.evaluate import exact_match

    assert len(get_tokenizer().encode(LONG_PROMPT)) > 4 * NANO_CONTEXT
    result = exact_match(exports["a"], EXAMPLES)
    assert result["n"] == 2 and 0 <= result["exact_match"] <= 1
    assert [s["expected"] for s in result["samples"]] == ["Hamlet", "Lady Macbeth of Scotland"]


def test_scoring_prompt_is_the_data_stage_prompt_and_fits_the_model() -> None:
    from pipeline.train.evaluate import scoring_requests

    tokenizer = get_tokenizer()
    data_context = 32  # data.context_length the examples were tokenized with
    requests = scoring_requests(tokenizer, EXAMPLES, data_context, NANO_CONTEXT)
    for example, (prompt_ids, params) in zip(EXAMPLES, requests, strict=True):
        ids, mask, _ = encode_example(tokenizer, example["prompt"], example["completion"], data_context + 1, "truncate")
        assert prompt_ids == [i for i, m in zip(ids, mask, strict=True) if not m]
        assert len(prompt_ids) + params.max_tokens <= NANO_CONTEXT
        assert params.max_tokens >= len(tokenizer.encode(example["completion"]))
        assert params.temperature == 0 and params.stop == ("\n",)
    # the budget is the example's own: a one-token name does not get the longest reference's
    assert requests[0][1].max_tokens < requests[1][1].max_tokens


def test_example_the_data_stage_would_reject_still_fits_the_model() -> None:
    from pipeline.train.evaluate import scoring_requests

    tokenizer = get_tokenizer()
    long_completion = {"prompt": "Speaker:", "completion": " " + "word " * 80}
    ((prompt_ids, params),) = scoring_requests(tokenizer, [long_completion], 32, NANO_CONTEXT)
    assert 1 <= len(prompt_ids) and len(prompt_ids) + params.max_tokens <= NANO_CONTEXT
