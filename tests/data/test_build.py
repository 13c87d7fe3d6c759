"""Data stage (raygpt tokenize): inputs, bad input, exact packing, determinism, splits, manifest discipline, readers.

Small corpora and a context of 8 tokens keep each Ray Data run to a second or two; one test runs the full sample.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.config import PipelineConfig, load_config
from pipeline.data import DataError
from pipeline.data.build import tokenize_corpus
from pipeline.data.clean import normalize
from pipeline.data.documents import is_validation
from pipeline.data.reader import SequenceStore, load_manifest, ordered_execution_options, ray_dataset
from pipeline.data.tokenize import encode_documents
from pipeline.model.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[2]
EOT = "<|endoftext|>"
WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls watch from an old oak tree".split()


def text_of(seed: int, words: int = 40) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), words)).capitalize() + "."


def config(run_dir: Path, inputs: list[str], **data: Any) -> PipelineConfig:
    overrides = [f"run.dir={run_dir}", f"data.inputs={json.dumps(inputs)}", "data.context_length=8"]
    overrides += ["data.num_tokenizers=1", "data.val_fraction=0.0"]
    overrides += [f"data.{key}={json.dumps(value)}" for key, value in data.items()]
    return load_config(None, overrides)


def build(run_dir: Path, inputs: list[str], overwrite: bool = False, **data: Any) -> dict[str, Any]:
    result = tokenize_corpus(config(run_dir, inputs, **data), overwrite=overwrite, log=lambda _: None)
    return result.manifest if not result.up_to_date else {"up_to_date": True}


def corpus(folder: Path, files: dict[str, str | bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def flat(run_dir: Path, split: str = "train") -> np.ndarray:
    store = SequenceStore(load_manifest(str(run_dir)), split)
    return store.read(0, len(store)).reshape(-1)


def assert_nothing_published(run_dir: Path) -> None:
    assert not (run_dir / "data").exists()
    leftovers = [p.name for p in run_dir.iterdir()] if run_dir.exists() else []
    assert not [name for name in leftovers if name.startswith(".data")], leftovers


# ---------------------------------------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope.*does not exist"):
        build(tmp_path / "run", [str(tmp_path / "nope")])


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not a corpus file")
    with pytest.raises(DataError, match=r"empty.*holds no \.txt, \.jsonl or \.parquet"):
        build(tmp_path / "run", [str(tmp_path / "empty")])


def test_glob_matching_nothing(tmp_path: Path) -> None:
    corpus(tmp_path / "c", {"a.txt": "hello"})
    with pytest.raises(DataError, match="matches no"):
        build(tmp_path / "run", [str(tmp_path / "c" / "*.jsonl")])


def test_non_utf8_is_replaced_and_counted(ray_session: None, tmp_path: Path) -> None:
    folder = corpus(tmp_path / "c", {"a.txt": text_of(1), "latin1.txt": "caf\xe9 cr\xe8me ".encode("latin-1") * 20})
    manifest = build(tmp_path / "run", [str(folder)])
    by_file = {item["rel"]: item for item in manifest["inputs"]}
    assert by_file["latin1.txt"]["replaced_chars"] == 40 and by_file["a.txt"]["replaced_chars"] == 0
    assert manifest["totals"]["replaced_chars"] == 40 and manifest["totals"]["files_with_replacements"] == 1
    assert "\ufffd" in get_tokenizer().decode(flat(tmp_path / "run"))


def test_non_utf8_fails_naming_the_file(ray_session: None, tmp_path: Path) -> None:
    folder = corpus(tmp_path / "c", {"a.txt": text_of(1), "latin1.txt": b"fine line\nsecond caf\xe9\n"})
    with pytest.raises(DataError, match=r"latin1\.txt: invalid UTF-8 at byte 20 \(line 2\)"):
        build(tmp_path / "run", [str(folder)], bad_utf8="fail")
    assert_nothing_published(tmp_path / "run")


def test_binary_file_fails_or_is_skipped(ray_session: None, tmp_path: Path) -> None:
    folder = corpus(tmp_path / "c", {"a.txt": text_of(1), "b.txt": bytes(range(256)) * 4})
    with pytest.raises(DataError, match=r"b\.txt: looks like a binary file"):
        build(tmp_path / "run", [str(folder)])
    assert_nothing_published(tmp_path / "run")
    manifest = build(tmp_path / "run", [str(folder)], skip_binary=True)
    assert manifest["totals"]["skipped_files"] == 1 and manifest["totals"]["documents"] == 1


def test_empty_documents_are_skipped_and_counted(ray_session: None, tmp_path: Path) -> None:
    rows = [{"text": text_of(1)}, {"text": "   \n"}, {"text": None}, {"text": ""}, {"text": text_of(2)}]
    folder = corpus(
        tmp_path / "c",
        {
            "a.txt": f"{text_of(3)}\n\n\n  \n\n{text_of(4)}\n\n",
            "blank.txt": "\n \r\n",
            "b.jsonl": "\n".join(json.dumps(r) for r in rows) + "\n\n",
        },
    )
    manifest = build(tmp_path / "run", [str(folder)], txt_document="paragraph")
    by_file = {item["rel"]: item for item in manifest["inputs"]}
    assert by_file["a.txt"]["documents"] == 2 and by_file["a.txt"]["skipped_documents"] == 0
    assert by_file["blank.txt"]["documents"] == 0 and by_file["blank.txt"]["skipped_documents"] == 1
    assert by_file["b.jsonl"]["documents"] == 2 and by_file["b.jsonl"]["skipped_documents"] == 3
    assert manifest["totals"]["documents"] == 4 and manifest["totals"]["skipped_documents"] == 4


def test_jsonl_line_that_is_not_json_names_file_and_line(ray_session: None, tmp_path: Path) -> None:
    folder = corpus(tmp_path / "c", {"a.jsonl": json.dumps({"text": text_of(1)}) + "\n\n{not json\n"})
    with pytest.raises(DataError, match=r"a\.jsonl, line 3: not valid JSON"):
        build(tmp_path / "run", [str(folder)])


def test_jsonl_line_without_the_field_names_file_and_line(ray_session: None, tmp_path: Path) -> None:
    lines = [json.dumps({"text": text_of(1)}), json.dumps({"body": "x"})]
    folder = corpus(tmp_path / "c", {"a.jsonl": "\n".join(lines)})
    with pytest.raises(DataError, match=r"a\.jsonl, line 2: no 'text' field \(fields: body\)"):
        build(tmp_path / "run", [str(folder)])


def test_corpus_shorter_than_one_sequence(ray_session: None, tmp_path: Path) -> None:
    folder = corpus(tmp_path / "c", {"a.txt": "Hi."})
    with pytest.raises(DataError, match=r"too short.*fewer than one sequence of context_length \+ 1 = 9"):
        build(tmp_path / "run", [str(folder)])
    assert_nothing_published(tmp_path / "run")


def test_failure_midway_never_leaves_a_partial_dataset(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pipeline.data.build.MIN_GROUP_BYTES", 1)  # shards of the good files get written first
    good = {f"{name}.txt": text_of(i, 200) for i, name in enumerate("abcdefg")}
    folder = corpus(tmp_path / "c", {**good, "z.jsonl": json.dumps({"text": "ok"}) + "\n[1, 2]\n"})
    run = tmp_path / "run"
    with pytest.raises(DataError, match=r"z\.jsonl, line 2: expected a JSON object"):
        build(run, [str(folder)], shard_sequences=4)
    assert_nothing_published(run)
    # over an existing dataset, a failed --overwrite leaves the old one intact
    first = build(run, [str(folder / f) for f in good])
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(DataError):
        build(run, [str(folder)], overwrite=True)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert load_manifest(str(run)).fingerprint == first["fingerprint"]


# ------------------------------------------------------------------------------------------------- exactness & order


@pytest.mark.parametrize("tail", ["drop", "wrap"])
def test_no_token_lost_or_duplicated(ray_session: None, tmp_path: Path, tail: str) -> None:
    texts = [text_of(i, 10 + 7 * i) for i in range(6)]
    texts[2] += " A literal <|endoftext|> in a document is ordinary text."
    folder = corpus(
        tmp_path / "c", {f"{i}.txt": "\r\n" + t.replace(" ", "\r\n", 1) + "\n\n" for i, t in enumerate(texts)}
    )
    manifest = build(tmp_path / "run", [str(folder)], pack_tail=tail)
    train = manifest["splits"]["train"]
    documents = [normalize(t.replace(" ", "\n", 1)) for t in texts]
    tokenizer = get_tokenizer()
    expected = np.concatenate([tokenizer.encode(d) + [tokenizer.eot_id] for d in documents])
    assert train["documents"] == 6 and train["tokens"] == len(expected)
    assert train["tokens"] == train["sequences"] * 9 + train["dropped_tokens"] - train["wrapped_tokens"]
    packed = flat(tmp_path / "run")
    if tail == "drop":
        assert train["wrapped_tokens"] == 0 and 0 < train["dropped_tokens"] < 9
        assert np.array_equal(packed, expected[: len(packed)])
        assert (EOT.join(documents) + EOT).startswith(tokenizer.decode(packed))
    else:
        assert train["dropped_tokens"] == 0 and 0 < train["wrapped_tokens"] < 9
        assert np.array_equal(packed, np.concatenate([expected, expected[: train["wrapped_tokens"]]]))


@pytest.mark.parametrize("tail", ["drop", "wrap"])
def test_blocks_are_packed_where_tokenized_and_their_tails_last(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tail: str
) -> None:
    """Each block's full rows, block after block, then the rows of the blocks' tails; the wrap takes the split's
    first ids. As many rows as packing the whole stream at once."""
    monkeypatch.setattr("pipeline.data.build.MIN_GROUP_BYTES", 1)  # a block per file
    texts = [text_of(i, 15 + 11 * i) for i in range(6)]
    folder = corpus(tmp_path / "c", {f"{i}.txt": t for i, t in enumerate(texts)})
    manifest = build(tmp_path / "run", [str(folder)], pack_tail=tail, shard_sequences=3, num_tokenizers=2)
    tokenizer = get_tokenizer()
    blocks = [np.array(tokenizer.encode(normalize(t)) + [tokenizer.eot_id]) for t in texts]
    rows = [block[: len(block) // 9 * 9] for block in blocks]
    tails = np.concatenate([block[len(block) // 9 * 9 :] for block in blocks])
    rest = tails[len(tails) // 9 * 9 :]
    expected = [*rows, tails[: len(tails) // 9 * 9]]
    if tail == "wrap" and len(rest):
        expected.append(np.concatenate([rest, np.concatenate(blocks)[: 9 - len(rest)]]))
    assert np.array_equal(flat(tmp_path / "run"), np.concatenate(expected))
    total = sum(map(len, blocks))
    train = manifest["splits"]["train"]
    assert train["tokens"] == total and train["sequences"] == total // 9 + (tail == "wrap" and total % 9 > 0)
    assert train["dropped_tokens"] == (total % 9 if tail == "drop" else 0)
    assert len(train["shards"]) > len(blocks)  # several shards per block, as shard_sequences says


def test_the_driver_receives_counts_and_tails_never_token_rows(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.data.build as build_module

    received: list[int] = []
    collect = build_module._collect

    def counting(batch: pa.Table, *args: Any) -> None:
        received.append(batch.nbytes)
        collect(batch, *args)

    monkeypatch.setattr(build_module, "_collect", counting)
    monkeypatch.setattr(build_module, "MIN_GROUP_BYTES", 1)  # several blocks
    folder = corpus(tmp_path / "c", {f"{i}.txt": text_of(i, 20_000) for i in range(4)})
    manifest = build(tmp_path / "run", [str(folder)], val_fraction=0.1)
    token_bytes = 2 * manifest["totals"]["tokens"]
    assert len(received) >= 1 and sum(received) < token_bytes / 50, (sum(received), token_bytes)


def test_documents_encoded_in_one_call_equal_each_encoded_alone() -> None:
    """encode_documents joins a batch's documents with <|endoftext|> into one encoder call; the ids must be those
    of each document encoded alone plus the id, also where a merge across the join could happen, and a document
    holding the special token's text must still get it as ordinary text."""
    tokenizer = get_tokenizer()
    rng = np.random.default_rng(7)
    pieces = ["Hello", " world", "  ", "\n\n", "'s", "'", "é", "😀", "123", "!", " ", "\t", "ab"]
    texts = ["".join(rng.choice(pieces, size=rng.integers(1, 12))) for _ in range(400)]
    texts += ["end with spaces   ", "   start with spaces", "x", "'ll", "\u200d"]
    for batch in (texts, [*texts[:50], f"a literal {EOT} stays text", *texts[50:]]):
        flat, lengths = encode_documents(tokenizer, batch)
        want = np.concatenate([tokenizer.encode(t) + [tokenizer.eot_id] for t in batch])
        assert flat.dtype == np.uint16 and np.array_equal(flat, want)
        assert lengths.tolist() == [len(tokenizer.encode(t)) + 1 for t in batch]


def test_two_runs_are_identical_whatever_the_number_of_actors(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pipeline.data.build.MIN_GROUP_BYTES", 1)  # one task per file, spread over the actors
    folder = corpus(tmp_path / "c", {f"{i}.txt": text_of(i, 60) for i in range(5)})
    one = build(tmp_path / "one", [str(folder)], val_fraction=0.4, shard_sequences=10)
    two = build(tmp_path / "two", [str(folder)], val_fraction=0.4, shard_sequences=10, num_tokenizers=2)
    assert {k: v for k, v in one.items() if k != "created"} == {k: v for k, v in two.items() if k != "created"}
    shards = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.parquet"))
    assert len(shards) > 2
    for shard in shards:
        assert (tmp_path / "one" / shard).read_bytes() == (tmp_path / "two" / shard).read_bytes()


def test_split_is_stable_when_a_file_is_added(ray_session: None, tmp_path: Path) -> None:
    blocks = lambda base: "\n\n".join(text_of(base + i, 12) for i in range(30))  # noqa: E731
    folder = corpus(tmp_path / "c", {"a.txt": blocks(0), "b.txt": blocks(100)})
    settings = {"txt_document": "paragraph", "val_fraction": 0.3}
    before = build(tmp_path / "one", [str(folder)], **settings)
    (folder / "c.txt").write_text(blocks(200))
    after = build(tmp_path / "two", [str(folder)], **settings)
    for name in ("a.txt", "b.txt"):
        val = sum(is_validation(f"{name}#{i}", 0.3) for i in range(30))
        assert 0 < val < 30
    assert before["splits"]["val"]["documents"] == sum(
        is_validation(f"{n}#{i}", 0.3) for n in ("a.txt", "b.txt") for i in range(30)
    )
    for split in ("train", "val"):
        old, new = flat(tmp_path / "one", split), flat(tmp_path / "two", split)
        assert np.array_equal(new[: len(old)], old)  # a and b's documents stay where they were
        assert after["splits"][split]["documents"] > before["splits"][split]["documents"]


# ---------------------------------------------------------------------------------------------------- input formats


def test_file_uris_and_globs(ray_session: None, tmp_path: Path) -> None:
    folder = corpus(tmp_path / "c", {"a.txt": text_of(1), "b.txt": text_of(2), "skip.md": "x"})
    by_path = build(tmp_path / "one", [str(folder)])
    by_uri = build(tmp_path / "two", [f"file://{folder}/*.txt"])
    assert [i["uri"] for i in by_uri["inputs"]] == [f"file://{folder}/a.txt", f"file://{folder}/b.txt"]
    assert by_uri["splits"]["train"]["tokens"] == by_path["splits"]["train"]["tokens"]
    assert np.array_equal(flat(tmp_path / "one"), flat(tmp_path / "two"))
    run_uri = build(tmp_path / "three", [f"file://{folder / 'a.txt'}"])
    assert run_uri["totals"]["documents"] == 1


def test_txt_document_modes(ray_session: None, tmp_path: Path) -> None:
    text = f"{text_of(1, 8)}\n{text_of(2, 8)}\n\n{text_of(3, 8)}\n\n\n{text_of(4, 8)}\n"
    folder = corpus(tmp_path / "c", {"a.txt": text})
    counts = {}
    for mode in ("file", "paragraph", "line"):
        counts[mode] = build(tmp_path / mode, [str(folder)], txt_document=mode)["totals"]
    assert [counts[m]["documents"] for m in ("file", "paragraph", "line")] == [1, 3, 4]
    assert counts["line"]["skipped_documents"] == 3


def test_jsonl_and_parquet_inputs_match_txt_lines(ray_session: None, tmp_path: Path) -> None:
    texts = [text_of(i, 20) for i in range(8)]
    folder = corpus(
        tmp_path / "c",
        {
            "a.txt": "\n".join(texts),
            "a.jsonl": "\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)),
        },
    )
    pq.write_table(pa.table({"body": texts, "n": list(range(8))}, schema=None), folder / "a.parquet", row_group_size=3)
    results = {}
    for kind in ("txt", "jsonl", "parquet"):
        results[kind] = build(tmp_path / kind, [str(folder / f"a.{kind}")], txt_document="line", text_field="body")
        assert results[kind]["totals"]["documents"] == 8
    assert len({r["splits"]["train"]["tokens"] for r in results.values()}) == 1
    assert np.array_equal(flat(tmp_path / "txt"), flat(tmp_path / "parquet"))
    pq.write_table(pa.table({"n": [1]}), folder / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: no column 'body'"):
        build(tmp_path / "bad", [str(folder / "bad.parquet")], text_field="body")


# ----------------------------------------------------------------------------------------------- manifest discipline


def test_rerun_is_a_noop_and_a_different_dataset_is_refused(ray_session: None, tmp_path: Path) -> None:
    folder = corpus(tmp_path / "c", {"a.txt": text_of(1), "b.txt": text_of(2)})
    run = tmp_path / "run"
    first = build(run, [str(folder)])
    assert build(run, [str(folder)]) == {"up_to_date": True}
    with pytest.raises(
        DataError, match=r"already holds a different dataset \(settings\.context_length: 8 -> 16.*--overwrite"
    ):
        build(run, [str(folder)], context_length=16)
    (folder / "c.txt").write_text(text_of(3))
    with pytest.raises(DataError, match=r"inputs: 1 added, 0 removed, 0 changed"):
        build(run, [str(folder)])
    second = build(run, [str(folder)], overwrite=True)
    assert second["fingerprint"] != first["fingerprint"] and second["totals"]["files"] == 3
    (tmp_path / "other" / "data").mkdir(parents=True)
    (tmp_path / "other" / "data" / "mine.txt").write_text("someone's files")
    with pytest.raises(DataError, match="is not a raygpt dataset; pass --overwrite"):
        build(tmp_path / "other", [str(folder)])


# ------------------------------------------------------------------------------------------------------------ reader


def test_reader_apis(ray_session: None, tmp_path: Path) -> None:
    folder = corpus(tmp_path / "c", {f"{i}.txt": text_of(i, 120) for i in range(4)})
    run = tmp_path / "run"
    build(run, [str(folder)], shard_sequences=7, val_fraction=0.3)
    manifest = load_manifest(str(run))
    assert load_manifest(str(run / "data")).data == manifest.data
    assert manifest.context_length == 8 and manifest.sequence_length == 9
    assert manifest.tokenizer["name"] == "r50k_base" and manifest.tokenizer["n_vocab"] == 50257
    train = manifest.splits["train"]
    assert train.sequences == sum(s.rows for s in train.shards) and len(train.shards) > 2
    store = SequenceStore(manifest, "train")
    everything = store.read(0, len(store))
    assert everything.shape == (len(store), 9) and everything.dtype == np.int64
    chunks = np.concatenate([store.read(i, min(i + 5, len(store))) for i in range(0, len(store), 5)])
    assert np.array_equal(chunks, everything)
    assert np.array_equal(SequenceStore(manifest, "train").read(6, 9), everything[6:9])  # crosses a shard
    rows = np.stack([row["tokens"] for row in ray_dataset(manifest, "train").take_all()])
    assert np.array_equal(rows, everything)
    assert ordered_execution_options().preserve_order  # for Ray Train's DataConfig(execution_options=...)
    with pytest.raises(IndexError):
        store.read(0, len(store) + 1)
    os.remove(run / "data" / train.shards[1].path)
    with pytest.raises(DataError, match="incomplete: 1 shard file"):
        load_manifest(str(run))
    (run / "data" / "manifest.json").write_text("{truncated")
    with pytest.raises(DataError, match="corrupt manifest"):
        load_manifest(str(run))
    with pytest.raises(DataError, match="no dataset manifest"):
        load_manifest(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------------------------------------------- CLI


def test_cli_tokenize_end_to_end(ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = corpus(tmp_path / "c", {f"{i}.txt": text_of(i, 100) for i in range(3)})
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(f"run:\n  dir: {tmp_path / 'run'}\ndata:\n  inputs: [{folder}]\n  context_length: 16\n")
    args = ["tokenize", "--config", str(config_file), "--set", "data.val_fraction=0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "tokenized: 3 documents" in out and "MB/s" in out
    assert load_manifest(str(tmp_path / "run")).context_length == 16
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert main([*args, "--set", "data.context_length=32"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["tokenize", "--set", f"data.inputs=[{tmp_path / 'missing'}]", "--set", f"run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_sample_corpus_with_defaults(ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    result = tokenize_corpus(load_config(None, [f"run.dir={tmp_path}"]), log=lambda _: None)
    manifest = result.manifest
    # a document is a blank-line block (a speech), so the 5% held out for validation come from every play
    assert manifest["totals"]["files"] == 42 and manifest["totals"]["documents"] > 30_000
    assert manifest["splits"]["val"]["documents"] > 1000 and manifest["splits"]["val"]["sequences"] > 400
    assert manifest["splits"]["train"]["sequences"] > 10_000 and manifest["dtype"] == "uint16"
    assert 1_400_000 < manifest["totals"]["tokens"] < 1_800_000
    assert "tokens" in result.summary()
