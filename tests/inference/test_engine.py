"""Tests for pipeline.inference (the continuously batched engine and its sampling) and pipeline.export.hf
(CPU, nano sizes)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from pipeline.export.hf import from_hf_state_dict, gpt_config_to_hf, hf_config_to_gpt, to_hf_state_dict
from pipeline.inference.engine import Engine
from pipeline.inference.outputs import Delta
from pipeline.inference.sampling import ContextLengthError, SamplingParams, sample_token
from pipeline.layout import resolve_export
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.model.tokenizer import get_tokenizer

CFG = GPTConfig(vocab_size=50257, context_length=48, n_layer=2, n_head=2, d_model=32)
PROMPTS = ["Hello world, this is", "ROMEO:", "A much longer prompt about the weather in Verona today", "x"]


def peaky_model(cfg: GPTConfig = CFG, seed: int = 0) -> GPT:
    """Random weights scaled up so logits are far from ties: greedy paths are then stable under float noise."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny ops: one intra-op thread is fastest, and far faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(peaky_model(), get_tokenizer(), max_batch_size=4)


@pytest.fixture(scope="module")
def prompt_ids(engine: Engine) -> list[list[int]]:
    return [engine.encode(p) for p in PROMPTS]


GREEDY = SamplingParams(max_tokens=8, temperature=0)


def test_hf_conversion_round_trip() -> None:
    pytest.importorskip("transformers")
    model = peaky_model()
    state = model.state_dict()
    hf_state = to_hf_state_dict(state)
    assert hf_state["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D (in, out)
    back = from_hf_state_dict(hf_state)
    assert set(back) == set(state)
    for name in state:
        torch.testing.assert_close(back[name], state[name], rtol=0, atol=0)
    assert hf_config_to_gpt(gpt_config_to_hf(CFG)) == CFG
    with pytest.raises(ValueError, match="sparse"):
        gpt_config_to_hf(GPTConfig(sparse_attention=True))


def test_greedy_equals_huggingface_generate(engine: Engine, prompt_ids: list[list[int]]) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel(gpt_config_to_hf(CFG)).eval()
    hf.load_state_dict(to_hf_state_dict(engine.model.state_dict()), strict=True)
    ours = engine.generate(prompt_ids, SamplingParams(max_tokens=12, temperature=0, stop_at_eot=False))
    for ids, completion in zip(prompt_ids, ours, strict=True):
        with torch.no_grad():
            expected = hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=12,
                min_new_tokens=12,
                pad_token_id=CFG.vocab_size - 1,
            )[0, len(ids) :].tolist()
        assert completion.token_ids == expected
        assert completion.finish_reason == "length" and completion.completion_tokens == 12
    assert len({tuple(c.token_ids) for c in ours}) == len(ours)  # not a degenerate comparison


def test_an_exported_model_generates_the_same_with_its_lm_head_stored_transposed(
    engine: Engine, prompt_ids: list[list[int]], tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """from_export stores the tied embedding / LM head transposed on CPUs (one row's logits stream faster): still one
    Parameter under both names, the same (vocab, d_model) values, the same greedy tokens as the model in memory."""
    from pipeline.export.format import save_export

    location = save_export(peaky_model(), CFG, tmp_path / "export", get_tokenizer().info())
    loaded, _ = Engine.from_export(location, max_batch_size=4)
    head, wte = loaded.model.lm_head.weight, loaded.model.transformer.wte.weight
    assert head is wte and head.shape == (CFG.vocab_size, CFG.d_model) and head.stride() == (1, CFG.vocab_size)
    assert torch.equal(head, engine.model.lm_head.weight)
    for ids in prompt_ids:  # one at a time: each decode step is a single row, the path the layout speeds up
        ours, reference = (e.generate([ids], GREEDY)[0] for e in (loaded, engine))
        assert ours.token_ids == reference.token_ids and ours.text == reference.text


def test_batched_and_joining_mid_batch_equal_solo(engine: Engine, prompt_ids: list[list[int]]) -> None:
    solo = [Engine(engine.model, engine.tokenizer).generate([p], GREEDY)[0].token_ids for p in prompt_ids]
    assert [c.token_ids for c in engine.generate(prompt_ids, GREEDY)] == solo
    # continuous batching: sequences join a running batch at different steps and leave when done
    got: dict[int, list[int]] = {}
    order: dict[int, int] = {}
    order[engine.add(prompt_ids[0], GREEDY)] = 0
    pending = list(enumerate(prompt_ids))[1:]
    widths = []
    while engine.has_work() or pending:
        if pending:
            i, ids = pending.pop(0)
            order[engine.add(ids, SamplingParams(max_tokens=8 - i, temperature=0))] = i
        for d in engine.step():
            got.setdefault(order[d.seq_id], []).extend(d.token_ids)
        widths.append(engine.num_running)
    assert max(widths) == 4 and widths[-1] == 0
    assert [got[i] for i in range(4)] == [s[: 8 - i] for i, s in enumerate(solo)]


def test_seed_reproducible_whatever_the_batch(engine: Engine, prompt_ids: list[list[int]]) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    alone = engine.generate([prompt_ids[1]], params)[0].token_ids
    other = SamplingParams(max_tokens=10, temperature=1.0, seed=99)
    batched = engine.generate(prompt_ids, [other, params, other, other])[1].token_ids
    assert alone == batched
    assert (
        engine.generate([prompt_ids[1]], SamplingParams(max_tokens=10, temperature=1.0, seed=8))[0].token_ids != alone
    )


def test_top_k_1_and_tiny_top_p_are_greedy(engine: Engine, prompt_ids: list[list[int]]) -> None:
    greedy = engine.generate(prompt_ids, GREEDY)
    for params in (SamplingParams(max_tokens=8, top_k=1), SamplingParams(max_tokens=8, top_p=1e-6)):
        assert [c.token_ids for c in engine.generate(prompt_ids, params)] == [c.token_ids for c in greedy]
    logits = torch.tensor([0.0, 5.0, 4.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, SamplingParams(top_k=2), gen) for _ in range(200)}
    assert draws == {1, 2}


def test_stop_strings_cut_text_and_stream_never_leaks(engine: Engine, prompt_ids: list[list[int]]) -> None:
    full = engine.generate([prompt_ids[0]], SamplingParams(max_tokens=10, temperature=0, logprobs=1))[0]
    stop = full.text[6:9]  # somewhere in the middle, spanning tokens
    chunks: list[Delta] = []
    params = SamplingParams(max_tokens=10, temperature=0, stop=("zzzz", stop), logprobs=1)
    done = engine.generate([prompt_ids[0]], params, on_delta=lambda _i, d: chunks.append(d))[0]
    assert done.text == full.text[: full.text.find(stop)]
    assert done.finish_reason == "stop" and chunks[-1].finish_reason == "stop"
    assert "".join(c.text for c in chunks) == done.text
    assert done.logprobs is not None
    assert "".join(done.logprobs.tokens).startswith(done.text) and done.logprobs.text_offset[0] == 0


def test_logprobs_echo_and_offsets(engine: Engine, prompt_ids: list[list[int]]) -> None:
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=3, echo=True)
    c = engine.generate([prompt_ids[0]], params)[0]
    lp = c.logprobs
    assert lp is not None and c.text.startswith(PROMPTS[0])
    n = len(prompt_ids[0]) + 4
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        assert c.text[offset:].startswith(token)
    for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        assert value is not None and top is not None and len(top) == 3 and value <= 0
    # greedy: the chosen token is the most likely one
    for token, value, top in zip(lp.tokens[-4:], lp.token_logprobs[-4:], lp.top_logprobs[-4:], strict=True):
        assert top is not None and max(top.values()) == pytest.approx(value) and token in top
    # max_tokens=0 with echo scores the prompt only
    scored = engine.generate([prompt_ids[0]], SamplingParams(max_tokens=0, logprobs=0, echo=True))[0]
    assert scored.text == PROMPTS[0] and scored.finish_reason == "length" and scored.completion_tokens == 0


def test_context_length_is_never_exceeded(engine: Engine) -> None:
    ids = list(range(1, 41))
    with pytest.raises(ContextLengthError, match="maximum context length is 48"):
        engine.generate([ids], SamplingParams(max_tokens=9))
    out = engine.generate([ids], SamplingParams(max_tokens=8, temperature=0, stop_at_eot=False))[0]
    assert out.completion_tokens == 8 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="token ids"):
        engine.add([CFG.vocab_size], GREEDY)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_abort_drops_a_sequence(engine: Engine, prompt_ids: list[list[int]]) -> None:
    keep = engine.add(prompt_ids[0], GREEDY)
    drop = engine.add(prompt_ids[1], SamplingParams(max_tokens=30, temperature=0))
    seen: set[int] = set()
    for _ in range(3):
        seen |= {d.seq_id for d in engine.step()}
    engine.abort(drop)
    after: set[int] = set()
    while engine.has_work():
        after |= {d.seq_id for d in engine.step()}
    assert seen == {keep, drop} and after == {keep}


def test_resolve_export_prefers_finetuned(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pipeline.config import PipelineConfig

    config = PipelineConfig.model_validate({"run": {"dir": str(tmp_path)}})
    assert resolve_export(config) == str(tmp_path / "export" / "init")
    for name in ("init", "pretrained"):
        (tmp_path / "export" / name).mkdir(parents=True)
        (tmp_path / "export" / name / "config.json").write_text("{}")
    assert resolve_export(config) == str(tmp_path / "export" / "pretrained")
    assert resolve_export(config, "elsewhere") == "elsewhere"


def test_streamed_text_is_the_decoded_tokens_even_with_partial_utf8(engine: Engine) -> None:
    tokenizer = engine.tokenizer
    # byte-level tokens that are halves of multi-byte characters ("é" = c3 a9, "€" = e2 82 ac)
    partial = [i for i in range(256) if tokenizer.decode_bytes([i]) in (b"\xc3", b"\xa9", b"\xe2", b"\x82", b"\xac")]
    assert len(partial) == 5
    prompts = [[15496] + partial[i:] for i in range(5)]
    for params in (SamplingParams(max_tokens=30, temperature=1.5, seed=3), SamplingParams(max_tokens=30, top_k=3)):
        for c in engine.generate(prompts, params):
            assert c.text == tokenizer.decode(c.token_ids)


def test_cli_generate_batch_of_prompts(tmp_path, capsys: pytest.CaptureFixture) -> None:  # type: ignore[no-untyped-def]
    from pipeline.cli import main

    run = ["--set", f"run.dir={tmp_path}", "--set", "model.preset=nano", "--set", "data.context_length=64"]
    assert main(["init-export", *run]) == 0
    capsys.readouterr()
    args = ["generate", *run, "--prompt", "ROMEO:", "--prompt", "JULIET:", "--max-tokens", "5", "--temperature", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("[length, 5 tokens]") + out.count("[stop, ") == 2 and "ROMEO:" in out and "JULIET:" in out
    assert main([*args, "--max-tokens", "100"]) == 2  # 100 + the prompt does not fit in nano's 64 positions
    assert "maximum context length is 64" in capsys.readouterr().err


@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 1e-50, 5e-324, 1e-30])
def test_tiny_temperatures_sample_the_greedy_token(temperature: float) -> None:
    """Dividing logits by a temperature this small overflows float32 (inf - inf = nan), which made every
    probability nan and the draw fall off the end of the vocabulary: an empty completion instead of greedy."""
    torch.manual_seed(0)
    logits = torch.randn(50257) * 5
    generator = torch.Generator().manual_seed(0)
    for top_k, top_p in ((0, 1.0), (40, 1.0), (0, 0.9)):
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        assert sample_token(logits, params, generator) == int(torch.argmax(logits))


def test_a_failed_step_leaves_no_sequence_unaccounted_for(engine: Engine, prompt_ids: list[list[int]]) -> None:
    """Sequences taken from the queue for a prefill that raises are in neither the queue nor the running batch;
    reset() must still return them, or their requests wait for the timeout instead of failing at once."""
    running = engine.add(prompt_ids[0], SamplingParams(max_tokens=20, temperature=0))
    engine.step()  # now running
    waiting = [engine.add(ids, SamplingParams(max_tokens=5, temperature=0)) for ids in prompt_ids[1:3]]
    real = engine.model.forward

    def broken(*args: object, **kwargs: object) -> object:
        if kwargs.get("past_key_values") is None:  # the prefill of the admitted sequences
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    engine.model.forward = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="injected"):
            engine.step()
    finally:
        del engine.model.forward
    assert sorted(engine.reset()) == sorted([running, *waiting])
    assert not engine.has_work()
    assert engine.generate([prompt_ids[0]], GREEDY)[0].token_ids  # and the engine serves the next request


def test_echo_logprobs_are_computed_in_bounded_chunks_between_other_requests() -> None:
    """Scoring a long echoed prompt computes only that prompt's logits, a bounded number of positions per step, so
    a short request beside it finishes within a few steps; the scores and offsets equal a direct computation."""
    cfg = GPTConfig(vocab_size=50257, context_length=1024, n_layer=1, n_head=1, d_model=16)
    model = peaky_model(cfg, seed=3)
    tokenizer = get_tokenizer()
    engine = Engine(model, tokenizer, max_batch_size=8)
    text = "naïve café, 東京の夜 😀; ROMEO: O, she doth teach the torches to burn bright! " * 40
    heavy = tokenizer.encode(text)[:1000]
    light = tokenizer.encode("ROMEO:")
    rows_per_call: list[int] = []
    handle = model.lm_head.register_forward_hook(  # rows of logits each LM-head call computes
        lambda _m, _args, out: rows_per_call.append(out.numel() // out.shape[-1])
    )
    try:
        heavy_ids = [
            engine.add(heavy, SamplingParams(max_tokens=1, temperature=0, logprobs=2, echo=True)) for _ in range(4)
        ]
        light_id = engine.add(light, SamplingParams(max_tokens=2, temperature=0))
        finished_at: dict[int, int] = {}
        merged: dict[int, Delta] = {}
        step = 0
        while engine.has_work():
            step += 1
            for delta in engine.step():
                merged.setdefault(delta.seq_id, Delta(delta.seq_id)).merge(delta)
                if delta.finish_reason is not None:
                    finished_at[delta.seq_id] = step
    finally:
        handle.remove()
    assert finished_at[light_id] <= 3, finished_at
    assert min(finished_at[i] for i in heavy_ids) > 10  # the scoring really was spread over many steps
    assert max(rows_per_call) <= 64, max(rows_per_call)  # never (batch x prompt) rows of 50,257 logits

    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([heavy])).logits[0].float(), dim=-1)
    for seq_id in heavy_ids:
        lp = merged[seq_id].logprobs
        assert lp is not None and len(lp.tokens) == len(heavy) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        expected = [float(logp[j - 1, heavy[j]]) for j in range(1, len(heavy))]
        assert lp.token_logprobs[1 : len(heavy)] == pytest.approx(expected, abs=1e-5)
        assert all(top is not None and len(top) == 2 for top in lp.top_logprobs[1:])
        offsets = [len(tokenizer.decode(heavy[:j])) for j in range(len(heavy))]
        assert lp.text_offset[: len(heavy)] == offsets


def _eot_model() -> GPT:
    """A model whose greedy next token is <|endoftext|> after every prompt: the final layer norm outputs a constant
    vector v (weight 0, bias v), and <|endoftext|>'s (tied) embedding is a large multiple of v."""
    model = peaky_model(seed=5)
    eot = get_tokenizer().eot_id
    with torch.no_grad():
        v = torch.randn(CFG.d_model)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(v)
        model.transformer.wte.weight[eot] = 5 * v
    return model


def test_a_generated_endoftext_is_in_the_logprobs_but_not_the_text() -> None:
    """As OpenAI and vLLM return it: a completion ended by <|endoftext|> lists that token (and its logprob) as its
    last logprobs entry while the text leaves it out. Harnesses rely on it: lm-eval scores a continuation as
    token_logprobs[ctxlen:-1] of an echo + max_tokens=1 request, dropping the last entry as the generated one."""
    tokenizer = get_tokenizer()
    engine = Engine(_eot_model(), tokenizer, max_batch_size=2)
    prompt = tokenizer.encode("To be, or not to be")
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=1, echo=True)
    completion = engine.generate([prompt], params)[0]
    lp = completion.logprobs
    assert completion.finish_reason == "stop" and completion.text == "To be, or not to be"
    assert lp is not None and len(lp.tokens) == len(prompt) + 1
    assert lp.tokens[-1] == "<|endoftext|>" and lp.text_offset[-1] == len(completion.text)
    assert lp.token_logprobs[-1] is not None and lp.top_logprobs[-1] == {"<|endoftext|>": lp.token_logprobs[-1]}
    assert completion.completion_tokens == 1
    # the continuation's score is the prompt's own entries, whatever was generated after it
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    ctxlen = 2
    expected = sum(float(logp[j - 1, prompt[j]]) for j in range(ctxlen, len(prompt)))
    assert sum(lp.token_logprobs[ctxlen:-1]) == pytest.approx(expected, rel=1e-5)

    # streamed the same way, and without echo the one entry is the <|endoftext|>
    plain = engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0, logprobs=0))[0]
    assert plain.text == "" and plain.logprobs is not None and plain.logprobs.tokens == ["<|endoftext|>"]
    assert plain.logprobs.text_offset == [0]
