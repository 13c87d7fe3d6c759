"""Evaluation during and after training: validation loss on every rank (all-reduced), and the fine-tuning task
metric, exact match of greedy completions on held-out prompt/completion pairs."""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.train.batches import IGNORE, Batches


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over all ranks (float64)."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def validation_loss(engine: Any, batches: Batches, device: torch.device) -> dict[str, float]:
    """Validation loss (mean over target tokens, all ranks) and perplexity."""
    engine.eval()
    loss_sum, count = 0.0, 0.0
    with torch.no_grad():
        for inputs, targets in batches.eval_batches():
            output = engine(inputs.to(device), targets.to(device))
            n = int((targets != IGNORE).sum())
            loss_sum += float(output.loss) * n
            count += n
    loss_sum, count = all_reduce_sum([loss_sum, count], device)
    engine.train()
    if count == 0:
        return {}
    val_loss = loss_sum / count
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


def normalize(text: str) -> str:
    """Completions are compared without surrounding whitespace (the target's leading space is a BPE artifact)."""
    return text.strip()


def exact_match(export: str, examples: list[dict[str, str]], batch_size: int = 32) -> dict[str, Any]:
    """Greedy-complete every prompt with the export and count completions equal to the reference."""
    from pipeline.inference.engine import Engine
    from pipeline.inference.sampling import SamplingParams

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
