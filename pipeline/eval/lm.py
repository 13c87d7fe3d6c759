"""``raygpt`` as an lm-eval model (``--model raygpt --model_args export=DIR,num_workers=N``): an export scored
directly, without HTTP, its requests spread over Ray actors when ``num_workers`` > 1.

Scoring follows lm-eval's ``hf`` backend token for token, so the two agree on the same weights: a request's
context and continuation are joined and left-truncated to ``context_length + 1`` tokens, the model sees all but the
last, and the continuation's tokens are scored from the last positions; rolling log-likelihoods use lm-eval's own
windows (``<|endoftext|>`` first, ``context_length`` tokens each). Generation runs raygpt's engine greedily.

:class:`TokenScoringLM` is lm-eval's side alone (requests to token pairs and back); what scores the pairs is
handed to it: :class:`Scorer` on an export here, the training engine's ranks in :mod:`pipeline.train.task_eval`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models: its registry loads them only while it is empty)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

Scored = tuple[float, bool]


@torch.no_grad()  # not inference_mode: DeepSpeed ZeRO-3 gathers parameters into these forwards
def score_pairs(
    model: Any, requests: list[tuple[list[int], int]], batch_size: int, device: torch.device | None = None
) -> list[Scored]:
    """``(tokens, n)``: the log-probability of the last ``n`` of ``tokens`` given the ones before, and whether each
    of them is the greedy choice; ``model`` maps input ids to an output with ``.logits``, ``batch_size`` rows at a
    time (right padding: causal rows ignore it)."""
    results: list[Scored] = []
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        width = max(len(tokens) - 1 for tokens, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (tokens, _) in enumerate(batch):
            ids[row, : len(tokens) - 1] = torch.tensor(tokens[:-1])
        logits = model(ids if device is None else ids.to(device)).logits
        for row, (tokens, n) in enumerate(batch):
            end = len(tokens) - 1
            logp = torch.log_softmax(logits[row, end - n : end].float(), dim=-1).cpu()
            target = torch.tensor(tokens[-n:])
            value = float(logp.gather(1, target[:, None]).sum())
            results.append((value, bool((logp.argmax(-1) == target).all())))
    return results


class Scorer:
    """One export in memory; scores (input ids, continuation length) pairs and generates. In-process, or the body
    of a Ray actor."""

    def __init__(self, export: str, tokenizer_file: str | None = None, batch_size: int = 8) -> None:
        from pipeline.inference.engine import Engine

        self.engine, self.info = Engine.from_export(export, max_batch_size=batch_size, tokenizer_file=tokenizer_file)
        self.model = self.engine.model
        self.batch_size = batch_size

    def score(self, requests: list[tuple[list[int], int]]) -> list[Scored]:
        return score_pairs(self.model, requests, self.batch_size)

    def generate(self, requests: list[tuple[list[int], int, list[str]]]) -> list[str]:
        from pipeline.inference.sampling import SamplingParams

        prompts = [prompt for prompt, _, _ in requests]
        params = [
            SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=tuple(until)[:4])
            for _, max_tokens, until in requests
        ]
        return [completion.text for completion in self.engine.generate(prompts, params)]


class TokenScoringLM(TemplateLM):
    """lm-eval's API on token ids: every request becomes (tokens, continuation length) pairs or greedy
    generations, handed in order to ``scorers`` (objects with ``score`` and ``generate``; Ray actor handles when
    ``remote``), one contiguous share each."""

    def __init__(
        self,
        tokenizer: Any,
        context_length: int,
        scorers: list[Any],
        remote: bool = False,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.context_length = context_length
        if max_length is not None and not 1 < int(max_length) <= self.context_length:
            raise ValueError(f"max_length must be in (1, {self.context_length}], the model's context")
        self.window = int(max_length) if max_length is not None else self.context_length
        self.max_gen_toks = int(max_gen_toks)
        self.scorers = scorers
        self.remote = remote

    def close(self) -> None:
        """End the scoring actors now. Their handles alone would keep them (and their CPUs) for as long as
        anything references this object, a traceback of a failed run included."""
        if self.remote:
            import ray

            for scorer in self.scorers:
                ray.kill(scorer)
        self.scorers = []

    # ------------------------------------------------------------------------------------------ lm-eval's API

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def max_length(self) -> int:
        return self.window

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode_with_special(string)  # as Hugging Face's GPT-2 tokenizer reads text

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any) -> list[Scored]:
        pairs = []
        for _, context, continuation in requests:
            tokens = (context + continuation)[-(self.max_length + 1) :]
            pairs.append((tokens, min(len(continuation), len(tokens) - 1)))
        return self._map("score", pairs)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        pairs, owners = [], []
        for index, request in enumerate(requests):
            (string,) = request.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, windows):
                pairs.append((context + continuation, len(continuation)))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (value, _) in zip(owners, self._map("score", pairs), strict=True):
            totals[owner] += value
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        work = []
        for request in requests:
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = min(int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
            prompt = self.tok_encode(context)[-(self.max_length - max_tokens) :] or [self.eot_token_id]
            work.append((prompt, max_tokens, until))
        return self._map("generate", work)

    # ------------------------------------------------------------------------------------------ spreading work

    def _map(self, method: str, items: list[Any]) -> list[Any]:
        """``method`` over ``items`` in order, one contiguous share per scorer."""
        if not items:
            return []
        if not self.remote:
            return getattr(self.scorers[0], method)(items)
        import ray

        share = math.ceil(len(items) / len(self.scorers))
        chunks = [items[i : i + share] for i in range(0, len(items), share)]
        refs = [getattr(scorer, method).remote(chunk) for scorer, chunk in zip(self.scorers, chunks, strict=False)]
        return [result for chunk in ray.get(refs) for result in chunk]


@register_model("raygpt")
class RaygptLM(TokenScoringLM):
    """lm-eval's view of a raygpt export. ``num_workers`` > 1 starts that many Ray actors (``num_cpus`` each)
    and splits every batch of requests among them in order."""

    def __init__(
        self,
        export: str,
        batch_size: int | str = 8,
        num_workers: int | str = 1,
        num_cpus: float | str = 1,
        tokenizer_file: str | None = None,
        max_gen_toks: int | str = 256,
        max_length: int | str | None = None,
        **_ignored: Any,
    ) -> None:
        from pipeline.export.format import read_export_info
        from pipeline.model.tokenizer import get_tokenizer

        info, _ = read_export_info(export)
        tokenizer = get_tokenizer(info.tokenizer.get("name", "r50k_base"), tokenizer_file)
        size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" is lm-eval's: a fixed size here
        workers = max(1, int(num_workers))
        if workers == 1:
            scorers: list[Any] = [Scorer(export, tokenizer_file, size)]
        else:
            import ray

            # this process is a Ray driver from here on; a child forked from it can start with one of Ray's
            # locks held and hang, so lm-eval's bootstrap errors run in-process (same resamples, same numbers)
            os.environ["DISABLE_MULTIPROC"] = "1"
            actor = ray.remote(num_cpus=float(num_cpus))(Scorer)
            scorers = [actor.remote(export, tokenizer_file, size) for _ in range(workers)]
        super().__init__(tokenizer, info.model.context_length, scorers, workers > 1, max_length, max_gen_toks)
