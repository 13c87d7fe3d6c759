"""The fine-tuning task metric: exact match of greedy completions on held-out prompt/completion pairs."""

from __future__ import annotations

from typing import Any

import torch


def normalize(text: str) -> str:
    """Completions are compared without surrounding whitespace (the target's leading space is a BPE artifact)."""
    return text.strip()


def exact_match(export: str, examples: list[dict[str, str]], batch_size: int = 32) -> dict[str, Any]:
    """Greedy-complete every prompt with the export and count completions equal to the reference."""
    from pipeline.generate import Engine, SamplingParams

    if not examples:
        return {"exact_match": None, "n": 0, "samples": []}
    torch.manual_seed(0)
    engine, _ = Engine.from_export(export, max_batch_size=batch_size)
    references = [normalize(example["completion"]) for example in examples]
    max_tokens = max(len(engine.encode(" " + ref)) for ref in references) + 2
    prompts = [engine.encode(example["prompt"]) for example in examples]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=("\n",))
    completions = engine.generate(prompts, params)
    hits = [normalize(c.text) == ref for c, ref in zip(completions, references, strict=True)]
    samples = [
        {"prompt": ex["prompt"][-80:], "expected": ref, "got": normalize(c.text)}
        for ex, ref, c in list(zip(examples, references, completions, strict=True))[:5]
    ]
    return {"exact_match": sum(hits) / len(hits), "n": len(hits), "samples": samples}
