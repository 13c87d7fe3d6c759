"""Batched text generation with the model's key/value cache and token-level continuous batching.

``Engine`` keeps one running batch: every ``step()`` first decodes one token for each running sequence, then
prefills the sequences waiting to join (up to ``max_batch_size``) and merges their caches into the batch.
Sequences of different lengths share the batch through left padding: each row's real tokens sit at the right
end of the cache, ``attention_mask`` hides the padding and the model derives each row's positions from it.
Finished sequences leave the batch at once, and leading all-padding columns are trimmed, so the batch's width
is always the longest live sequence (which never exceeds the context length).

Sampling is per sequence (:mod:`pipeline.inference.sampling`). Stop strings are matched on the decoded text; the
returned text ends before the stop string, and streamed text is held back while it could still be the start of one.
``<|endoftext|>`` ends a sequence (finish_reason ``stop``) and is not part of its text; with logprobs it is the last
entry of the logprobs, as OpenAI and vLLM return it (it was generated, and counts in ``completion_tokens``).

``raygpt generate``, fine-tune scoring and the Serve replicas (:mod:`pipeline.serve.replica`) all run this engine;
it knows nothing about HTTP or Ray.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.inference.outputs import Completion, Delta, FinishReason, Logprobs
from pipeline.inference.sampling import SamplingParams, check_context_length, prompt_length, sample_token
from pipeline.model.gpt import GPT, KVCache
from pipeline.model.tokenizer import Tokenizer


@dataclass
class _Entry:  # one token's logprob record
    token: str
    logprob: float | None
    top: dict[str, float] | None


class _Sequence:
    """Per-sequence state: tokens, decoded text, what has been released to the caller."""

    def __init__(
        self, seq_id: int, prompt_ids: list[int], params: SamplingParams, budget: int, prompt_text: str | None
    ) -> None:
        self.id = seq_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.budget = budget  # tokens it may generate
        self.prompt_text = prompt_text
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed % 2**64)  # any integer is a valid seed
        self.next_token = -1  # sampled, not yet in the cache
        self.ids: list[int] = []  # generated ids that count as text (no <|endoftext|>)
        self.generated = 0
        self.ends: list[int] = []  # decoded length after each id
        self.entries: list[_Entry] = []
        self.eot_entry: _Entry | None = None  # the <|endoftext|> that ended it: in the logprobs, not the text
        self.raw = b""  # UTF-8 bytes of ``ids``
        self.text = ""
        self.released_chars = 0
        self.released_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.cut = False  # the text was cut at a stop string
        self.max_stop = max((len(s) for s in params.stop), default=0)
        self.offset_base = 0  # len(prompt text) when echoing


class _PromptScoring:
    """An echo + logprobs sequence whose prompt is being scored, a bounded number of positions per step, before it
    joins the running batch. Holds the prompt's final hidden states (not its logits), its own key/value cache, and
    the next-token logits of its last position."""

    def __init__(
        self, seq: _Sequence, hidden: torch.Tensor, cache: KVCache, mask: torch.Tensor, last_logits: torch.Tensor
    ) -> None:
        self.seq = seq
        self.hidden = hidden  # (T, d_model): position j's hidden state predicts prompt token j + 1
        self.cache, self.mask, self.last_logits = cache, mask, last_logits
        self.scored = 0  # positions done, of len(prompt) - 1
        self.logprobs = Logprobs()


class Engine:
    """Continuous-batching generator over one model. ``add`` and ``abort`` may be called from any thread while
    another thread runs ``step``."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        max_batch_size: int = 8,
        device: str | torch.device | None = None,
        prompt_logprobs_chunk: int = 64,
    ) -> None:
        if max_batch_size < 1 or prompt_logprobs_chunk < 1:
            raise ValueError("max_batch_size and prompt_logprobs_chunk must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        # Prompt positions scored per step for echo + logprobs: bounds that work (and its logits, chunk x vocab) so
        # the running batch keeps decoding while a long prompt is scored.
        self.prompt_logprobs_chunk = prompt_logprobs_chunk
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.context_length = model.config.context_length
        self.eot_id = tokenizer.eot_id
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._waiting: deque[_Sequence] = deque()
        self._aborted: set[int] = set()
        self._running: list[_Sequence] = []
        self._admitting: list[_Sequence] = []
        self._scoring: deque[_PromptScoring] = deque()
        self._cache: KVCache | None = None
        self._mask: torch.Tensor | None = None  # (B, T) 1 = real token
        self._cached_tokens = 0

    @classmethod
    def from_export(
        cls,
        location: str | Path,
        max_batch_size: int = 8,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        tokenizer_file: str | None = None,
    ) -> tuple[Engine, Any]:
        """An engine over a loaded export; returns ``(engine, ExportInfo)``."""
        from pipeline.export.format import ExportError, load_export
        from pipeline.model.tokenizer import get_tokenizer

        model, info = load_export(location, device=device, dtype=dtype)
        if torch.device(device).type == "cpu":
            _lm_head_columns_contiguous(model)
        tokenizer = get_tokenizer(info.tokenizer.get("name", "r50k_base"), tokenizer_file)
        if info.tokenizer.get("sha256") not in (None, tokenizer.sha256):
            raise ExportError(f"export {str(location)!r} was made with another {tokenizer.name} file (sha256 differs)")
        return cls(model, tokenizer, max_batch_size=max_batch_size, device=device), info

    # ------------------------------------------------------------------------------------------ public API

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ``ContextLengthError`` / ``ValueError`` when the request cannot run."""
        check_context_length(prompt_ids, params.max_tokens, self.context_length)
        vocab = self.model.config.vocab_size
        if any(not 0 <= int(t) < vocab for t in prompt_ids):
            raise ValueError(f"token ids must be in [0, {vocab})")

    def add(self, prompt_ids: Sequence[int], params: SamplingParams, prompt_text: str | None = None) -> int:
        """Queue a sequence; returns its id. An empty prompt starts from <|endoftext|> (as GPT-2/3 do)."""
        ids = [int(t) for t in prompt_ids]
        if not ids:
            ids, prompt_text = [self.eot_id], ""
        self.check(ids, params)
        seq = _Sequence(next(self._ids), ids, params, params.max_tokens, prompt_text)
        with self._lock:
            self._waiting.append(seq)
        return seq.id

    def abort(self, seq_id: int) -> None:
        """Drop a sequence (waiting or running) at the next step; nothing more is reported for it."""
        with self._lock:
            self._aborted.add(seq_id)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting or self._scoring)

    @property
    def num_running(self) -> int:
        """Sequences holding a batch slot: decoding, or having their echoed prompt scored."""
        return len(self._running) + len(self._scoring)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_cached_tokens(self) -> int:
        """Positions whose keys and values the engine holds for its sequences (padding excluded), as of the last
        step: a plain int, so any thread may read it while another steps."""
        return self._cached_tokens

    @property
    def cache_capacity(self) -> int:
        """Positions the batch's cache can hold: ``max_batch_size`` rows of the context length."""
        return self.max_batch_size * self.context_length

    def reset(self) -> list[int]:
        """Forget every sequence (after a failed step); returns the ids of all it held: waiting, running, and those
        the failed step had taken from the queue to admit."""
        with self._lock:
            ids = [s.id for s in self._waiting] + [s.id for s in self._admitting] + [s.id for s in self._running]
            ids += [p.seq.id for p in self._scoring]
            self._waiting.clear()
            self._aborted.clear()
        self._running, self._admitting, self._cache, self._mask = [], [], None, None
        self._scoring.clear()
        self._cached_tokens = 0
        return ids

    @torch.inference_mode()
    def step(self) -> list[Delta]:
        """Decode one token for every running sequence, admit waiting ones (their first token), then score the next
        chunk of echoed prompts."""
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            if aborted:
                self._waiting = deque(s for s in self._waiting if s.id not in aborted)
                self._scoring = deque(p for p in self._scoring if p.seq.id not in aborted)
            free = self.max_batch_size - sum(1 for s in self._running if s.id not in aborted) - len(self._scoring)
            admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            self._admitting = admitted  # neither waiting nor running until the prefill is done
        if aborted:
            self._keep([row for row, s in enumerate(self._running) if s.id not in aborted])
        deltas: list[Delta] = []
        if self._running:
            deltas += self._decode()
        if admitted:
            deltas += self._prefill(admitted)
        self._admitting = []
        if self._scoring:
            deltas += self._score_prompts()
        self._cached_tokens = self._count_cached()
        return deltas

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        on_delta: Callable[[int, Delta], None] | None = None,
    ) -> list[Completion]:
        """Run prompts to completion (offline use); ``on_delta(prompt_index, delta)`` sees the stream."""
        per = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per) != len(prompts):
            raise ValueError("give one SamplingParams or one per prompt")
        index: dict[int, int] = {}
        for prompt, p in zip(prompts, per, strict=True):
            self.check(prompt, p)
        for i, (prompt, p) in enumerate(zip(prompts, per, strict=True)):
            index[self.add(prompt, p)] = i
        results: dict[int, Delta] = {}
        while len(results) < len(prompts) or any(d.finish_reason is None for d in results.values()):
            for delta in self.step():
                i = index[delta.seq_id]
                if on_delta is not None:
                    on_delta(i, delta)
                results.setdefault(i, Delta(delta.seq_id)).merge(delta)
        out = []
        for i, prompt in enumerate(prompts):
            d = results[i]
            assert d.finish_reason is not None
            out.append(
                Completion(
                    text=d.text,
                    token_ids=d.token_ids,
                    finish_reason=d.finish_reason,
                    prompt_tokens=prompt_length(prompt),
                    completion_tokens=d.completion_tokens,
                    logprobs=d.logprobs,
                )
            )
        return out

    # ------------------------------------------------------------------------------------------ internals

    def _count_cached(self) -> int:
        """A running sequence's cache holds its prompt and every sampled token but the last (fed at the next
        decode); a sequence being scored holds its prompt."""
        running = sum(len(s.prompt_ids) + s.generated - 1 for s in self._running)
        return running + sum(len(p.seq.prompt_ids) for p in self._scoring)

    def _keep(self, rows: list[int]) -> None:
        """Keep only these rows of the running batch, then trim leading all-padding columns."""
        if len(rows) == len(self._running):
            return
        self._running = [self._running[r] for r in rows]
        if not rows:
            self._cache, self._mask = None, None
            return
        assert self._cache is not None and self._mask is not None
        index = torch.tensor(rows, device=self.device)
        mask = self._mask.index_select(0, index)
        start = int(mask.any(0).long().argmax())  # first column some row still uses
        self._mask = mask[:, start:]
        self._cache = tuple(
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:]) for k, v in self._cache
        )

    def _decode(self) -> list[Delta]:
        assert self._cache is not None and self._mask is not None
        ids = torch.tensor([[s.next_token] for s in self._running], dtype=torch.long, device=self.device)
        mask = torch.cat([self._mask, torch.ones_like(ids)], dim=1)
        out = self.model(ids, past_key_values=self._cache, use_cache=True, attention_mask=mask)
        self._cache, self._mask = out.past_key_values, mask
        logits = out.logits[:, -1].float().cpu()  # sampling and logprobs run on the CPU (per-sequence RNGs)
        deltas = [self._advance(seq, logits[row]) for row, seq in enumerate(self._running)]
        self._keep([row for row, s in enumerate(self._running) if s.finish_reason is None])
        return deltas

    def _prefill(self, seqs: list[_Sequence]) -> list[Delta]:
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(seqs), width, dtype=torch.long, device=self.device)
        for row, s in enumerate(seqs):
            ids[row, width - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids, device=self.device)
            mask[row, width - len(s.prompt_ids) :] = 1
        with _last_position_logits(self.model) as hidden:
            out = self.model(ids, use_cache=True, attention_mask=mask)
        assert out.past_key_values is not None
        deltas, keep = [], []
        for row, s in enumerate(seqs):
            if s.params.echo and s.params.logprobs is not None and s.prompt_text != "":
                index = torch.tensor([row], device=self.device)
                cache = tuple((k.index_select(0, index), v.index_select(0, index)) for k, v in out.past_key_values)
                prompt_hidden = hidden[0][row, width - len(s.prompt_ids) :]
                last = out.logits[row, -1].float().cpu()
                self._scoring.append(_PromptScoring(s, prompt_hidden, cache, mask[row : row + 1], last))
                continue
            delta = self._echo(s) if s.params.echo else None
            first = self._first_token(s, out.logits[row, -1].float().cpu())
            if delta is None:
                delta = first
            else:
                delta.merge(first)
            deltas.append(delta)
            if s.finish_reason is None:
                keep.append(row)
        if keep:
            index = torch.tensor(keep, device=self.device)
            self._merge(
                tuple((k.index_select(0, index), v.index_select(0, index)) for k, v in out.past_key_values),
                mask.index_select(0, index),
            )
            self._running += [seqs[row] for row in keep]
        return deltas

    def _first_token(self, seq: _Sequence, logits: torch.Tensor) -> Delta:
        if seq.budget == 0:  # max_tokens=0: the prompt only
            seq.finish_reason = "length"
            return Delta(seq.id, finish_reason="length")
        return self._advance(seq, logits)

    def _score_prompts(self) -> list[Delta]:
        """Score up to ``prompt_logprobs_chunk`` prompt positions of the sequences being scored, oldest first; a
        sequence whose prompt is done releases its echo and first token and joins the running batch."""
        budget, deltas = self.prompt_logprobs_chunk, []
        while self._scoring and budget > 0:
            job = self._scoring[0]
            seq, lp = job.seq, job.logprobs
            positions = len(seq.prompt_ids) - 1
            stop = min(positions, job.scored + budget)
            if stop > job.scored:
                logits = self.model.lm_head(job.hidden[job.scored : stop])
                logp = torch.log_softmax(logits.float(), dim=-1).cpu()
                targets = torch.tensor(seq.prompt_ids[job.scored + 1 : stop + 1])
                chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
                values, indices = torch.topk(logp, seq.params.logprobs or 0, dim=-1)
                for value, top_values, top_ids in zip(chosen, values.tolist(), indices.tolist(), strict=True):
                    lp.token_logprobs.append(value)
                    lp.top_logprobs.append({self._token_str(i): v for v, i in zip(top_values, top_ids, strict=True)})
                budget -= stop - job.scored
                job.scored = stop
            if job.scored < positions:
                break
            self._scoring.popleft()
            delta = self._echo(seq, lp)
            delta.merge(self._first_token(seq, job.last_logits))
            deltas.append(delta)
            if seq.finish_reason is None:
                self._merge(job.cache, job.mask)
                self._running.append(seq)
        return deltas

    def _merge(self, cache: KVCache, mask: torch.Tensor) -> None:
        if self._cache is None or self._mask is None:
            self._cache, self._mask = cache, mask
            return
        width = max(self._mask.size(1), mask.size(1))

        def pad(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            missing = width - t.size(-dim_from_end)
            if missing == 0:
                return t
            spec = [0, 0] * (dim_from_end - 1) + [missing, 0]
            return F.pad(t, spec)

        self._cache = tuple(
            (torch.cat([pad(k0, 2), pad(k1, 2)]), torch.cat([pad(v0, 2), pad(v1, 2)]))
            for (k0, v0), (k1, v1) in zip(self._cache, cache, strict=True)
        )
        self._mask = torch.cat([pad(self._mask, 1), pad(mask, 1)])

    def _token_str(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _entry(self, logits: torch.Tensor, token: int, n_top: int) -> _Entry:
        logp = torch.log_softmax(logits.float(), dim=-1)
        values, indices = torch.topk(logp, n_top)
        top = {self._token_str(int(i)): float(v) for v, i in zip(values, indices, strict=True)}
        return _Entry(self._token_str(token), float(logp[token]), top)

    def _echo(self, seq: _Sequence, scores: Logprobs | None = None) -> Delta:
        """The prompt as the first output; ``scores``: its token logprobs from the second token on (with logprobs)."""
        text = seq.prompt_text if seq.prompt_text is not None else self.tokenizer.decode(seq.prompt_ids)
        seq.offset_base = len(text)
        delta = Delta(seq.id, text=text, token_ids=list(seq.prompt_ids) if seq.prompt_text != "" else [])
        if seq.params.logprobs is not None:
            lp = Logprobs()
            if seq.prompt_text != "":
                assert scores is not None
                lp.tokens = [self._token_str(token) for token in seq.prompt_ids]
                lp.text_offset = self._offsets(seq.prompt_ids)
                lp.token_logprobs = [None, *scores.token_logprobs]
                lp.top_logprobs = [None, *scores.top_logprobs]
            delta.logprobs = lp
        return delta

    def _offsets(self, ids: list[int]) -> list[int]:
        """Each token's start in the decoded text, ``len(decode(ids[:j]))``, in one pass: the characters decoded so
        far, plus the one replacement character that a pending incomplete UTF-8 sequence decodes to."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        offsets, chars = [], 0
        for token in ids:
            pending = decoder.getstate()[0]
            offsets.append(chars + (1 if pending else 0))
            chars += len(decoder.decode(self.tokenizer.decode_bytes([token])))
        return offsets

    def _advance(self, seq: _Sequence, logits: torch.Tensor) -> Delta:
        """Sample the next token of ``seq`` from ``logits`` (V,), update its text, return what to release."""
        p = seq.params
        token = sample_token(logits, p, seq.generator)
        seq.generated += 1
        seq.next_token = token
        if token == self.eot_id and p.stop_at_eot:
            seq.finish_reason = "stop"
            if p.logprobs is not None:
                seq.eot_entry = self._entry(logits, token, p.logprobs)
        else:
            seq.ids.append(token)
            if p.logprobs is not None:
                seq.entries.append(self._entry(logits, token, p.logprobs))
            seq.raw += self.tokenizer.decode_bytes([token])
            full = seq.raw.decode("utf-8", errors="replace")
            seq.ends.append(max(len(full), seq.ends[-1] if seq.ends else 0))
            # a stop string new in this step ends after the text that was already searched
            start = max(0, len(seq.text) - seq.max_stop - 4)
            cut = min((i for i in (full.find(s, start) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                full = full[:cut]
                seq.finish_reason = "stop"
            seq.text = full
            seq.cut = cut >= 0
        if seq.finish_reason is None and seq.generated >= seq.budget:
            seq.finish_reason = "length"
        return self._release(seq)

    def _release(self, seq: _Sequence) -> Delta:
        text = seq.text
        if seq.finish_reason is None:
            releasable = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character may still change
            if seq.max_stop > 1:
                releasable = min(releasable, len(text) - (seq.max_stop - 1))
            releasable = max(releasable, seq.released_chars)
            n_tokens = seq.released_tokens
            while n_tokens < len(seq.ids) and seq.ends[n_tokens] <= releasable:
                n_tokens += 1
        else:
            releasable = len(text)
            n_tokens = len(seq.ids)
            if seq.cut:  # only the tokens that contributed to the text before the stop string
                n_tokens = seq.released_tokens
                while n_tokens < len(seq.ids) and _start(seq, n_tokens) < len(text):
                    n_tokens += 1
        delta = Delta(
            seq.id,
            text=text[seq.released_chars : releasable],
            token_ids=seq.ids[seq.released_tokens : n_tokens],
            finish_reason=seq.finish_reason,
            completion_tokens=seq.generated,
        )
        if seq.params.logprobs is not None:
            lp = Logprobs()
            for i in range(seq.released_tokens, n_tokens):
                entry = seq.entries[i]
                lp.tokens.append(entry.token)
                lp.token_logprobs.append(entry.logprob)
                lp.top_logprobs.append(entry.top)
                lp.text_offset.append(seq.offset_base + _start(seq, i))
            if seq.eot_entry is not None:  # released once, last, at the end of the text
                entry, seq.eot_entry = seq.eot_entry, None
                lp.tokens.append(entry.token)
                lp.token_logprobs.append(entry.logprob)
                lp.top_logprobs.append(entry.top)
                lp.text_offset.append(seq.offset_base + len(text))
            delta.logprobs = lp
        seq.released_chars, seq.released_tokens = releasable, n_tokens
        return delta


def _lm_head_columns_contiguous(model: GPT) -> None:
    """Store the tied embedding / LM-head weight transposed: the same values and the same ``(vocab, d_model)``
    view, over a ``(d_model, vocab)`` buffer. On CPUs the logits of one row (decoding a single sequence, prefilling
    one) then take a fraction of the time: the matrix-vector product streams that layout several times faster
    (r50k x 128 on one thread: 3.4 -> 1.0 ms); batches of rows run the same kernel as before, and the embedding
    lookup reads strided rows (microseconds). Only for a model the engine owns, never one being trained."""
    weight = model.transformer.wte.weight
    model.transformer.wte.weight = torch.nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=False)
    model.tie_weights()


@contextlib.contextmanager
def _last_position_logits(model: GPT) -> Iterator[list[torch.Tensor]]:
    """Within the block, the LM head only sees the last position: a prefill needs the next-token logits of each
    row (rows are left padded, so the last column is every row's last token), not ``(B, T, vocab)`` of them. The
    list it yields receives the LM head's full input, the final hidden states ``(B, T, d_model)``."""
    hidden: list[torch.Tensor] = []

    def last_position(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        hidden.append(args[0])
        return (args[0][:, -1:],)

    handle = model.lm_head.register_forward_pre_hook(last_position)
    try:
        yield hidden
    finally:
        handle.remove()


def _start(seq: _Sequence, i: int) -> int:
    return seq.ends[i - 1] if i > 0 else 0
