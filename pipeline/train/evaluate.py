"""Evaluation during and after training: validation loss on every rank (all-reduced), and the fine-tuning task
metric, exact match of greedy completions on held-out prompt/completion pairs."""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.inference.sampling import SamplingParams
from pipeline.train.batches import IGNORE, Batches


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over all ranks (float64)."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def validation_loss(
    engine: Any, batches: Batches, device: torch.device, loss_chunk_rows: int | None = None
) -> dict[str, float]:
    """Validation loss (mean over target tokens, all ranks) and perplexity."""
    engine.eval()
    loss_sum, count = 0.0, 0.0
    with torch.no_grad():
        for inputs, targets in batches.eval_batches():
            output = engine(inputs.to(device), targets.to(device), loss_chunk_rows=loss_chunk_rows)
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


def scoring_requests(
    tokenizer: Any, examples: list[dict[str, str]], context_length: int, model_context: int
) -> list[tuple[list[int], SamplingParams]]:
    """The prompt ids and greedy sampling parameters that score each example.

    The prompt is the one the model was fine-tuned on: cut at its start exactly as the data stage cuts an example
    of ``context_length + 1`` ids (:func:`pipeline.data.finetune.encode_example`), so a held-out prompt longer
    than the context is scored on its end, never refused. Each example gets its own completion budget (its
    reference's length plus 2, capped to the room the prompt leaves in the model's ``model_context``): a long
    reference elsewhere neither costs a short one tokens nor pushes its prompt out of the context. An example the
    data stage would reject (a completion that alone fills the context) keeps the end of its prompt that fits
    beside the capped budget. Either way the prompt plus the budget fits the model.
    """
    from pipeline.data.finetune import encode_example

    requests = []
    for example in examples:
        wanted = len(tokenizer.encode(" " + normalize(example["completion"]))) + 2
        encoded = encode_example(tokenizer, example["prompt"], example["completion"], context_length + 1, "truncate")
        if encoded is not None:
            ids, mask, _ = encoded
            prompt_ids = [token for token, in_loss in zip(ids, mask, strict=True) if not in_loss]
            max_tokens = max(1, min(wanted, model_context - len(prompt_ids)))
        else:
            max_tokens = max(1, min(wanted, model_context - 1))
            prompt_ids = tokenizer.encode(example["prompt"])
        prompt_ids = prompt_ids[max(0, len(prompt_ids) - (model_context - max_tokens)) :]
        requests.append((prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=("\n",))))
    return requests


def exact_match(
    export: str,
    examples: list[dict[str, str]],
    context_length: int | None = None,
    tokenizer_file: str | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Greedy-complete every prompt with the export and count completions equal to the reference.

    ``context_length``: the fine-tuning sequence length (the plan's), which decides how a long prompt is cut
    (:func:`scoring_requests`); default: the model's context. ``tokenizer_file``: ``data.tokenizer_file``, for an
    encoding that is not shipped.
    """
    from pipeline.inference.engine import Engine

    if not examples:
        return {"exact_match": None, "n": 0, "samples": []}
    torch.manual_seed(0)
    engine, _ = Engine.from_export(export, max_batch_size=batch_size, tokenizer_file=tokenizer_file)
    model_context = engine.context_length
    requests = scoring_requests(
        engine.tokenizer, examples, min(context_length or model_context, model_context), model_context
    )
    references = [normalize(example["completion"]) for example in examples]
    completions = engine.generate([ids for ids, _ in requests], [params for _, params in requests])
    hits = [normalize(c.text) == ref for c, ref in zip(completions, references, strict=True)]
    samples = [
        {"prompt": ex["prompt"][-80:], "expected": ref, "got": normalize(c.text)}
        for ex, ref, c in list(zip(examples, references, completions, strict=True))[:5]
    ]
    return {"exact_match": sum(hits) / len(hits), "n": len(hits), "samples": samples}
