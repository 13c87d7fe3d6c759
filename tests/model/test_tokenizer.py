"""The vendored GPT-2/GPT-3 BPE: offline, hash-verified, exact ids, lossless round trip."""

import hashlib
from pathlib import Path

import pytest

from pipeline.model.tokenizer import ASSETS_DIR, EOT_ID, TokenizerError, clear_cache, get_tokenizer

REPO = Path(__file__).resolve().parents[2]
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def test_known_ids() -> None:
    tokenizer = get_tokenizer()
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.n_vocab == 50257
    assert tokenizer.eot_id == EOT_ID == 50256
    assert tokenizer.info() == {"name": "r50k_base", "sha256": R50K_SHA256, "n_vocab": 50257, "eot_id": 50256}


def test_vendored_file_is_the_pinned_one() -> None:
    data = (ASSETS_DIR / "r50k_base.tiktoken").read_bytes()
    assert hashlib.sha256(data).hexdigest() == R50K_SHA256


def test_loaded_once_per_process_and_gpt2_alias() -> None:
    assert get_tokenizer() is get_tokenizer("r50k_base")
    assert get_tokenizer("gpt2").encode("Hello world") == [15496, 995]


def test_special_token_is_not_injected_from_text() -> None:
    tokenizer = get_tokenizer()
    ids = tokenizer.encode("a<|endoftext|>b")
    assert EOT_ID not in ids
    assert tokenizer.decode(ids) == "a<|endoftext|>b"
    assert tokenizer.decode([EOT_ID]) == "<|endoftext|>"


def test_batch_helpers() -> None:
    tokenizer = get_tokenizer()
    texts = ["Hello world", "", "To be, or not to be", "naïve café ☃"]
    batch = tokenizer.encode_batch(texts)
    assert batch == [tokenizer.encode(t) for t in texts]
    assert tokenizer.decode_batch(batch) == texts


def test_round_trip_on_the_sample_corpus() -> None:
    tokenizer = get_tokenizer()
    files = sorted((REPO / "data" / "sample" / "shakespeare").glob("*.txt"))
    assert len(files) >= 40
    texts = [f.read_text(encoding="utf-8") for f in files]
    encoded = tokenizer.encode_batch(texts)
    assert tokenizer.decode_batch(encoded) == texts
    total = sum(map(len, encoded))
    assert 1_400_000 < total < 1_800_000  # ~1.57M tokens for ~5 MB of English


def test_missing_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAYGPT_TOKENIZER_DIR", str(tmp_path))
    with pytest.raises(TokenizerError, match="cl100k_base.tiktoken' not found .*never downloads"):
        get_tokenizer("cl100k_base")
    with pytest.raises(TokenizerError, match="does not exist"):
        get_tokenizer("r50k_base", str(tmp_path / "nope.tiktoken"))
    with pytest.raises(TokenizerError, match="unknown tiktoken encoding 'gpt5'"):
        get_tokenizer("gpt5")


def test_bad_hash_is_a_clear_error(tmp_path: Path) -> None:
    corrupt = tmp_path / "r50k_base.tiktoken"
    data = bytearray((ASSETS_DIR / "r50k_base.tiktoken").read_bytes())
    data[100] ^= 1
    corrupt.write_bytes(bytes(data))
    with pytest.raises(TokenizerError, match="has sha256 .* expected 306cd27f"):
        get_tokenizer("r50k_base", str(corrupt))
    # the right file under another encoding's name is refused too
    wrong = tmp_path / "cl100k_base.tiktoken"
    wrong.write_bytes((ASSETS_DIR / "r50k_base.tiktoken").read_bytes())
    with pytest.raises(TokenizerError, match="corrupt or belongs to another encoding"):
        get_tokenizer("cl100k_base", str(wrong))


def test_tokenizer_dir_is_searched_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Only r50k_base ships (other rank files cannot be fetched here), so check the lookup order with it:
    # a file in $RAYGPT_TOKENIZER_DIR wins over the shipped asset.
    copy = tmp_path / "r50k_base.tiktoken"
    copy.write_bytes((ASSETS_DIR / "r50k_base.tiktoken").read_bytes())
    monkeypatch.setenv("RAYGPT_TOKENIZER_DIR", str(tmp_path))
    clear_cache()
    try:
        tokenizer = get_tokenizer("r50k_base")
        assert tokenizer.path == str(copy)
        assert tokenizer.encode("Hello world") == [15496, 995]
    finally:
        clear_cache()
