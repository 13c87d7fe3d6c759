"""``data.sources``: named inputs with sampling weights (GPT-3's mixture). Each source is packed on its own, the
manifest counts each, and training draws from them by weight in a deterministic, resumable blended order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.corpora import two_sources

from pipeline.config import ConfigError, load_config
from pipeline.data.build import tokenize_corpus
from pipeline.data.reader import SequenceStore, load_manifest
from pipeline.layout import RunLayout
from pipeline.model.tokenizer import get_tokenizer
from pipeline.train.batches import source_usage, training_order
from pipeline.train.order import BlendedOrder

def test_each_source_is_packed_apart_and_counted(tmp_path: Path, ray_session: None) -> None:
    config = load_config(None, two_sources(tmp_path))
    manifest = tokenize_corpus(config, log=lambda _: None).manifest
    sources = manifest["sources"]
    assert list(sources) == ["books", "web"]
    assert (sources["books"]["weight"], sources["web"]["weight"]) == (0.7, 0.3)
    assert sources["web"]["files"] == 1 and sources["web"]["documents"] == 10
    assert sources["books"]["documents"] + sources["web"]["documents"] == manifest["totals"]["documents"]
    assert sources["books"]["tokens"] + sources["web"]["tokens"] == manifest["totals"]["tokens"]
    for split in ("train", "val"):
        per_source = [shard["path"] for name in sources for shard in sources[name]["splits"][split]["shards"]]
        assert [shard["path"] for shard in manifest["splits"][split]["shards"]] == per_source
    assert all(s["path"].startswith("train/web/") for s in sources["web"]["splits"]["train"]["shards"])

    # the train split holds the books' sequences, then the web's: no sequence mixes the two
    loaded = load_manifest(RunLayout.of(config).data)
    store = SequenceStore(loaded, "train")
    n_books = sources["books"]["splits"]["train"]["sequences"]
    tokenizer = get_tokenizer()
    web_text = tokenizer.decode(store.read(n_books, len(store)).reshape(-1).tolist())
    books_text = tokenizer.decode(store.read(0, n_books).reshape(-1).tolist())
    assert "web page" not in books_text and "MACBETH" in books_text.upper()
    assert set(web_text.replace("<|endoftext|>", " ").split()) <= {"web", "page"} | {f"{i}:" for i in range(10)}

    # the blend: every prefix of a few dozen steps' positions is within a point of the weights
    order = training_order(loaded, len(store), seed=config.run.seed)
    assert isinstance(order, BlendedOrder)
    drawn = order.indices(0, 24 * 8)
    web_share = np.cumsum(drawn >= n_books) / np.arange(1, len(drawn) + 1)
    assert np.all(np.abs(web_share[99:] - 0.3) < 0.01)  # within one position of the exact share
    usage = source_usage(loaded, 24 * 8, config.run.seed)
    web_epochs, web_sequences = usage["epochs_by_source"]["web"], sources["web"]["splits"]["train"]["sequences"]
    assert web_epochs == pytest.approx(24 * 8 * 0.3 / web_sequences, abs=1 / web_sequences)
    assert web_epochs > 1 > usage["epochs_by_source"]["books"]  # the small source is upsampled, the large is not

    # another weight is another dataset; the same sources again are up to date
    assert tokenize_corpus(config, log=lambda _: None).up_to_date
    with pytest.raises(Exception, match="already holds a different dataset .*sources"):
        tokenize_corpus(load_config(None, two_sources(tmp_path, 0.5, 0.5)), log=lambda _: None)


def test_blended_order_is_exact_at_every_position_and_resumable() -> None:
    sizes, weights = [50, 1000, 7], [0.6, 0.3, 0.1]
    order = BlendedOrder(sizes, weights, seed=3, offsets=[0, 50, 1050])
    stream = order.indices(0, 5000)
    source = np.searchsorted([50, 1050], stream, side="right")
    for count in range(1, 5000):
        counts = np.bincount(source[:count], minlength=3)
        assert np.all(np.abs(counts - np.asarray(weights) * count) < 1.0 + 1e-9), count
    assert np.array_equal(order.positions_by_source(4321), np.bincount(source[:4321], minlength=3))
    # any range read on its own (a resumed run) is the same stream
    for start, count in ((0, 7), (999, 3), (1234, 500), (4999, 1)):
        assert np.array_equal(order.indices(start, count), stream[start : start + count])
    # each source is visited epoch by epoch: every sequence once before any repeats
    small = stream[source == 2] - 1050
    assert sorted(small[:7]) == list(range(7)) and sorted(small[7:14]) == list(range(7))


def test_sources_or_inputs_not_both_and_names_unique(tmp_path: Path) -> None:
    sources = json.dumps([{"name": "a", "inputs": ["x"]}, {"name": "a", "inputs": ["y"]}])
    with pytest.raises(ConfigError, match="names must be unique"):
        load_config(None, [f"data.sources={sources}"])
    one = json.dumps([{"name": "a", "inputs": ["x"]}])
    with pytest.raises(ConfigError, match="data.sources or data.inputs, not both"):
        load_config(None, [f"data.sources={one}", "data.inputs=[y]"])
    with pytest.raises(ConfigError, match="weight"):
        load_config(None, [f"data.sources={json.dumps([{'name': 'a', 'inputs': ['x'], 'weight': 0}])}"])
