"""Curation in the data stage (``data.dedup``, ``data.decontaminate``) on a two-source corpus with planted exact
duplicates (another case and spacing), near duplicates (one word changed) and planted evaluation text: the manifest
counts each per source, the first of each group of duplicates survives, the survivors are the same whatever the
number of actors, and ``action: flag`` keeps and counts instead of removing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import load_config
from pipeline.data import build
from pipeline.data.build import tokenize_corpus
from pipeline.data.curate import _bucket_links, _later_in_components, _shard_links, band_buckets
from pipeline.data.reader import SequenceStore, load_manifest
from pipeline.layout import RunLayout
from pipeline.model.tokenizer import get_tokenizer

VOCAB = "river stone cloud lantern meadow copper violet harbor thistle ember orchard quartz willow falcon".split()
EVALUATION = "the tide of the ancient harbor carried seven silver boats past the lighthouse at dawn"


def words(seed: int, n: int = 80) -> list[str]:
    rng = np.random.default_rng(seed)
    return [VOCAB[i] for i in rng.integers(0, len(VOCAB), n)]


def planted(tmp_path: Path) -> list[str]:
    exact = " ".join(words(1))
    near = words(2)
    changed = [*near[:40], "zebra", *near[41:]]
    web = [
        exact,
        " ".join(words(3)),
        " ".join(near),
        "  ".join(exact.upper().split()),  # the exact duplicate: another case and spacing
        " ".join(changed),  # the near duplicate: one word of 80 changed
        " ".join(words(4)[:30]) + " " + EVALUATION + " markedcontaminated",
        *(" ".join(words(10 + i)) for i in range(6)),
    ]
    (tmp_path / "web").mkdir(exist_ok=True)
    (tmp_path / "web" / "pages.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in web))
    (tmp_path / "books").mkdir(exist_ok=True)
    (tmp_path / "books" / "book.txt").write_text("\n\n".join(" ".join(words(100 + i)) for i in range(30)) + "\n")
    (tmp_path / "books" / "copy.txt").write_text(exact + "\n")  # a duplicate across sources: the web's is first
    (tmp_path / "eval.jsonl").write_text(json.dumps({"question": EVALUATION.upper() + "?", "answer": "x"}) + "\n")
    sources = [
        {"name": "web", "inputs": [str(tmp_path / "web")], "weight": 0.5},
        {"name": "books", "inputs": [str(tmp_path / "books")], "weight": 0.5},
    ]
    return [
        f"data.sources={json.dumps(sources)}",
        "data.context_length=16",
        "data.val_fraction=0",
        "data.txt_document=paragraph",
        "data.dedup.exact=true",
        "data.dedup.near=true",
        f"data.decontaminate.against=[{tmp_path / 'eval.jsonl'}]",
    ]


def train_text(config) -> str:
    store = SequenceStore(load_manifest(RunLayout.of(config).data), "train")
    return get_tokenizer().decode(store.read(0, len(store)).reshape(-1).tolist())


def test_duplicates_and_contamination_are_counted_and_dropped(tmp_path: Path, ray_session: None) -> None:
    settings = planted(tmp_path)
    one = load_config(None, [*settings, f"run.dir={tmp_path / 'one'}", "data.num_tokenizers=1"])
    manifest = tokenize_corpus(one, log=lambda _: None).manifest
    web, books = manifest["sources"]["web"], manifest["sources"]["books"]
    assert (web["exact_duplicates"], web["near_duplicates"], web["contaminated"]) == (1, 1, 1)
    assert (books["exact_duplicates"], books["near_duplicates"], books["contaminated"]) == (1, 0, 0)
    assert web["documents"] == 12 - 3
    totals = manifest["totals"]
    assert (totals["exact_duplicates"], totals["near_duplicates"], totals["contaminated"]) == (2, 1, 1)
    text = train_text(one)
    assert "zebra" not in text and "markedcontaminated" not in text
    assert " ".join(words(1)) in text and " ".join(words(1)).upper() not in text
    assert " ".join(words(2)) in text  # the first of the near pair

    # the same survivors with two actors (other blocks, other order of work)
    two = load_config(None, [*settings, f"run.dir={tmp_path / 'two'}", "data.num_tokenizers=2"])
    again = tokenize_corpus(two, log=lambda _: None).manifest
    assert again["fingerprint"] == manifest["fingerprint"] and train_text(two) == text

    flag = load_config(None, [*settings, f"run.dir={tmp_path / 'flag'}", "data.decontaminate.action=flag"])
    flagged = tokenize_corpus(flag, log=lambda _: None).manifest
    assert flagged["sources"]["web"]["contaminated_kept"] == 1 and "contaminated" not in flagged["sources"]["web"]
    assert "markedcontaminated" in train_text(flag)


def test_without_curation_nothing_is_dropped_or_counted(tmp_path: Path, ray_session: None) -> None:
    settings = [s for s in planted(tmp_path) if not s.startswith(("data.dedup", "data.decontaminate"))]
    config = load_config(None, [*settings, f"run.dir={tmp_path / 'plain'}", "data.num_tokenizers=1"])
    manifest = tokenize_corpus(config, log=lambda _: None).manifest
    assert "curation" not in manifest and "exact_duplicates" not in manifest["sources"]["web"]
    assert manifest["sources"]["web"]["documents"] == 12
    assert "zebra" in train_text(config)


def test_blocks_of_exact_duplicates_only_do_not_break_the_near_search(
    tmp_path: Path, ray_session: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a corpus copied several times, one block per file: the blocks of the copies hold exact duplicates only, so
    # after they are left out of the near-duplicate search they have no rows at all; and a blank file's block has
    # no document to begin with
    monkeypatch.setattr(build, "MIN_GROUP_BYTES", 1)
    text = "\n\n".join(" ".join(words(200 + i)) for i in range(20)) + "\n"
    for copy in range(4):
        (tmp_path / "corpus" / f"copy{copy}").mkdir(parents=True)
        (tmp_path / "corpus" / f"copy{copy}" / "book.txt").write_text(text)
    (tmp_path / "corpus" / "copy1" / "blank.txt").write_text(" \n\n")  # a block with no document at all
    settings = [f"data.inputs=[{tmp_path / 'corpus'}]", "data.context_length=16", "data.val_fraction=0"]
    settings += ["data.dedup.exact=true", "data.dedup.near=true", "data.num_tokenizers=2"]
    config = load_config(None, [*settings, f"run.dir={tmp_path / 'run'}"])
    totals = tokenize_corpus(config, log=lambda _: None).manifest["totals"]
    assert (totals["documents"], totals["exact_duplicates"], totals["near_duplicates"]) == (20, 60, 0)


def _bucket(keys: list[int], signatures: list[np.ndarray]) -> pa.Table:
    return pa.table(
        {"key": pa.array(keys, pa.int64()), "signature": pa.array([s.tobytes() for s in signatures], pa.binary())}
    )


def test_a_bucket_of_many_copies_gives_one_link_per_copy() -> None:
    """Thousands of copies of one document share every bucket (boilerplate, a replicated corpus): linking all
    pairs was n(n - 1)/2 rows per bucket and exhausted the driver's memory on a 56 MB corpus of 11 copies."""
    copies = 3000
    signature = np.arange(128, dtype=np.uint32)
    links = _bucket_links(_bucket(list(range(copies, 0, -1)), [signature] * copies), 0.8)
    assert links.num_rows == copies - 1
    assert set(links.column("first").to_pylist()) == {1}
    assert sorted(links.column("other").to_pylist()) == list(range(2, copies + 1))


def test_links_join_what_a_chain_of_similar_documents_joins() -> None:
    """a ~ b and b ~ c make one group even where a and c differ too much; an unrelated d stays apart."""
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2**32, 128, dtype=np.uint32)
    b, c = a.copy(), a.copy()
    b[:20] += 1  # b agrees with a on 108 of 128 slots (0.84)
    c[:20] += 1
    c[20:40] += 1  # c agrees with b on 0.84, with a on 0.69
    d = rng.integers(0, 2**32, 128, dtype=np.uint32)
    links = _bucket_links(_bucket([5, 9, 1, 7], [a, b, c, d]), 0.8)
    assert sorted(zip(links.column("first").to_pylist(), links.column("other").to_pylist(), strict=True)) == [
        (1, 5),
        (1, 9),
    ]
    # across buckets: links 1-5 (one band) and 5-12 (another) make one group whose first is 1
    assert _later_in_components(np.array([1, 5, 30]), np.array([5, 12, 31])).tolist() == [5, 12, 31]
    assert _later_in_components(np.empty(0, np.int64), np.empty(0, np.int64)).tolist() == []


def test_band_buckets_agree_exactly_where_a_band_agrees() -> None:
    rng = np.random.default_rng(4)
    a = rng.integers(0, 2**32, 128, dtype=np.uint32)
    b = a.copy()
    b[3] += 1  # band 0 differs, bands 1..15 agree
    same_slots_other_band = np.roll(a, 8)  # band 1 of this one holds band 0's slots of a
    buckets = band_buckets(np.stack([a, b, same_slots_other_band]), 16)
    assert buckets.shape == (3, 16) and buckets.dtype == np.int64
    assert buckets[0, 0] != buckets[1, 0] and (buckets[0, 1:] == buckets[1, 1:]).all()
    assert buckets[2, 1] != buckets[0, 0]  # a band's index is part of its bucket
    assert len(np.unique(buckets[0])) == 16


def test_a_shard_of_buckets_links_as_its_buckets_do_one_by_one() -> None:
    rng = np.random.default_rng(5)
    base = [rng.integers(0, 2**32, 128, dtype=np.uint32) for _ in range(4)]
    keys, buckets, signatures = [], [], []
    for key in range(40):
        signature = base[key % 4].copy()
        signature[: key % 3 * 15] += 1  # agreement 1.0, 0.88 or 0.77 with the base
        keys.append(key)
        buckets.append(key % 4 if key % 5 else 100 + key)  # some buckets of one document
        signatures.append(signature)
    shard = _bucket(keys, signatures).append_column("bucket", pa.array(buckets, pa.int64()))
    order = rng.permutation(len(keys))
    got = _shard_links(shard.take(pa.array(order)), 0.8)
    want = [_bucket_links(shard.filter(pa.array(np.asarray(buckets) == b)), 0.8) for b in sorted(set(buckets))]

    def pairs(tables: list[pa.Table]) -> list[tuple[int, int]]:
        return sorted(
            (f, o) for t in tables for f, o in zip(t["first"].to_pylist(), t["other"].to_pylist(), strict=True)
        )

    assert pairs([got]) == pairs(want) and len(pairs(want)) > 0
    assert _shard_links(shard.slice(0, 0), 0.8).num_rows == 0
