"""The Hugging Face export is complete on its own: weights, config and the tokenizer, built offline from the
shipped rank file, so transformers (and lm-eval's ``hf`` backend) load it with no tokenizer argument."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.export.format import save_export
from pipeline.export.hf import export_hf
from pipeline.inference.engine import Engine
from pipeline.inference.sampling import SamplingParams
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.model.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[2]
CONFIG = GPTConfig(vocab_size=50257, context_length=64, n_layer=2, n_head=2, d_model=32)
HARD = [
    "Hello world",
    "  lots   of\n\n\n spaces\t\ttabs  \r\n\r\n",
    "naïve café, 東京の夜, Ωμέγα, 😀👍🏽, \u200b zero width",
    "1234567 3.14159 1,000,000 0x1F",
    "<|endoftext|>ROMEO: O Romeo<|endoftext|>",
    "'s 're 'VE 'll I'M don't",
    "a" * 500 + " " + "!" * 40,
    "",
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    export = save_export(GPT(CONFIG).eval(), CONFIG, root / "export", get_tokenizer().info(), metadata={})
    return export_hf(str(export), root / "hf")


def test_the_hf_export_carries_a_tokenizer_equal_to_tiktoken(hf_dir: Path) -> None:
    from transformers import AutoTokenizer

    assert (hf_dir / "tokenizer.json").is_file() and (hf_dir / "tokenizer_config.json").is_file()
    hf = AutoTokenizer.from_pretrained(hf_dir)
    tiktoken = get_tokenizer().encoding
    corpus = HARD + [p.read_text(encoding="utf-8") for p in sorted((REPO / "data" / "sample").rglob("*.txt"))[:4]]
    for text in corpus:
        assert hf(text)["input_ids"] == tiktoken.encode(text, allowed_special="all"), text[:60]
        assert hf.decode(tiktoken.encode(text, allowed_special="all")) == text
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == 50256 and hf.model_max_length == 64
    assert hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) == (
        "User: hi\nAssistant:"
    )


def test_transformers_pipeline_runs_the_hf_export_with_no_tokenizer_argument(hf_dir: Path) -> None:
    import transformers

    generator = transformers.pipeline("text-generation", model=str(hf_dir), device="cpu")
    out = generator("ROMEO:", max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    engine, _ = Engine.from_export(hf_dir.parent / "export")
    ours = engine.generate([engine.encode("ROMEO:")], SamplingParams(max_tokens=6, temperature=0, stop_at_eot=False))
    assert out == ours[0].text
