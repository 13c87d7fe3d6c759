"""Autoregressive sampling with the model's key/value cache (one prompt at a time)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.model import GPT


@torch.inference_mode()
def sample(
    model: GPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
) -> list[int]:
    """New token ids after ``prompt_ids``; greedy when temperature is 0. Never runs past the context length."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    context = model.config.context_length
    if len(prompt_ids) >= context:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {context}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    budget = min(max_new_tokens, context - len(prompt_ids))
    tokens = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    past = None
    produced: list[int] = []
    for _ in range(budget):
        output = model(tokens, past_key_values=past, use_cache=True)
        past = output.past_key_values
        logits = output.logits[0, -1].float()
        if temperature <= 0:
            next_id = int(torch.argmax(logits))
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        produced.append(next_id)
        if next_id in stop_ids:
            break
        tokens = torch.tensor([[next_id]], dtype=torch.long, device=device)
    return produced
