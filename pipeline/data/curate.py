"""GPT-3's curation of the pretraining corpus as Ray Data stages: exact and near-duplicate documents, and training
documents that overlap the evaluation sets (Brown et al. 2020, section 2.2 and appendix C).

A first pass over the documents computes per document, on a pool of actors, a small record: its key (input file
and position), a hash of its normalized text, its MinHash signature (rensa, word n-gram shingles) cut into LSH
bands (each band's bucket hashed for the whole block at once), and whether one of its word n-grams occurs in an
evaluation set. Grouping by hash (exact) and by band (near) runs as Ray Data groupbys, so the work spreads over the
cluster; a group is a shard of hashes (the hash modulo a count sized to the rows), handled with array operations,
since one call per hash costs more than the work in it. Only the keys of the documents to drop come back to the
driver. In every group of duplicates the document with the smallest key (first in input order) survives, so the
survivors do not depend on block order or the number of workers. Near duplicates are pairs that share a band and
whose signatures estimate a Jaccard similarity of at least ``dedup.threshold``; a chain of them keeps only its
first document. Only the train split is decontaminated: validation text never trains the model.

The documents dropped are then filtered out of the tokenize pass (:func:`drop_documents`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.data.documents import KIND_DOCUMENT, TRAIN

KEY_FILE_SHIFT = 40  # key = file_index << 40 | doc_index: input order, and the file it came from
SHARD_ROWS = 50_000  # rows per call of a grouped stage: groups are shards of hashes, not single hashes
WORD = re.compile(r"\w+")


def document_keys(file_index: np.ndarray, doc_index: np.ndarray) -> np.ndarray:
    return (file_index.astype(np.int64) << KEY_FILE_SHIFT) | doc_index.astype(np.int64)


def file_of(keys: np.ndarray) -> np.ndarray:
    return np.asarray(keys, dtype=np.int64) >> KEY_FILE_SHIFT


def words(text: str) -> list[str]:
    """Lower-cased word characters: the unit of shingles and of evaluation overlaps (punctuation and spacing
    differences do not hide an overlap)."""
    return WORD.findall(text.lower())


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def ngram_hashes(text: str, n: int) -> set[int]:
    tokens = words(text)
    return {_hash64(" ".join(tokens[i : i + n]).encode()) for i in range(len(tokens) - n + 1)}


def evaluation_ngrams(paths: list[str], n: int) -> np.ndarray:
    """Sorted hashes of every word n-gram of every string field of every JSONL record in ``paths``."""
    from pipeline.data.clean import jsonl_line_records
    from pipeline.data.errors import DataError

    found: set[int] = set()
    for path in paths:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise DataError(f"data.decontaminate.against: cannot read {path} ({exc.strerror or exc})") from None
        for _, record in jsonl_line_records(lines, f"data.decontaminate.against: {path}"):
            found |= ngram_hashes(" ".join(_strings(record)), n)
    return np.array(sorted(found), dtype=np.int64)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, element-wise on uint64 (wrapping arithmetic)."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def band_buckets(signatures: np.ndarray, bands: int) -> np.ndarray:
    """The LSH bucket of each band of each signature (``(documents, num_perm)`` uint32 -> ``(documents, bands)``
    int64): a 64-bit hash of the band's index and slots, computed for all documents at once. Documents share a
    bucket when a band's slots agree (or, with odds of about 2**-64 per pair, by collision, which only adds a pair to
    compare)."""
    count = len(signatures)
    rows = signatures.shape[1] // bands
    slots = signatures[:, : bands * rows].reshape(count, bands, rows).astype(np.uint64)
    h = np.broadcast_to(_mix64(np.arange(1, bands + 1, dtype=np.uint64)), (count, bands))
    for row in range(rows):
        h = _mix64(h ^ slots[:, :, row])
    return h.view(np.int64)


class Fingerprints:
    """Ray Data actor: document rows to one record per document (``key``, ``exact``, ``bands``, ``signature``,
    ``contaminated``)."""

    def __init__(self, settings: dict[str, Any], evaluation: list[Any]) -> None:
        import ray

        self.s = settings
        self.evaluation = ray.get(evaluation[0]) if evaluation else np.empty(0, np.int64)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from rensa import RMinHash

        is_doc = batch.column("kind").to_numpy() == KIND_DOCUMENT
        table = batch.filter(pa.array(is_doc))
        keys = document_keys(table.column("file_index").to_numpy(), table.column("doc_index").to_numpy())
        train = table.column("split").to_numpy() == TRAIN
        exact, signatures, contaminated = [], [], []
        s = self.s
        for text, is_train in zip(table.column("text").to_pylist(), train, strict=True):
            tokens = words(text)
            exact.append(_hash64(" ".join(tokens).encode()) if s["exact"] else 0)
            if s["near"]:
                n = s["ngram"]
                shingles = [" ".join(tokens[i : i + n]) for i in range(max(1, len(tokens) - n + 1))]
                minhash = RMinHash(num_perm=s["num_perm"], seed=s["seed"])
                minhash.update(shingles)
                signatures.append(np.asarray(minhash.digest(), dtype=np.uint32))
            hit = False
            if is_train and len(self.evaluation):
                grams = np.fromiter(ngram_hashes(text, s["contamination_ngram"]), np.int64)
                hit = bool(np.isin(grams, self.evaluation, assume_unique=True).any())
            contaminated.append(hit)
        if s["near"] and signatures:
            matrix = np.stack(signatures)
            buckets = band_buckets(matrix, s["bands"])
            signature = pa.array([row.tobytes() for row in matrix], pa.binary())
        else:
            buckets = np.zeros((len(keys), 0), np.int64)
            signature = pa.array([b""] * len(keys), pa.binary())
        offsets = np.arange(len(keys) + 1, dtype=np.int32) * buckets.shape[1]
        return pa.table(
            {
                "key": pa.array(keys, pa.int64()),
                "exact": pa.array(exact, pa.int64()),
                "bands": pa.ListArray.from_arrays(pa.array(offsets), pa.array(buckets.reshape(-1), pa.int64())),
                "signature": signature,
                "contaminated": pa.array(contaminated, pa.bool_()),
            }
        )


def _with_shard(batch: pa.Table, column: str, shards: int) -> pa.Table:
    """The batch with a ``shard`` column: ``column`` (a hash) modulo ``shards``."""
    return batch.append_column("shard", pa.array(np.mod(batch.column(column).to_numpy(), shards), pa.int64()))


def _later_keys(shard: pa.Table) -> pa.Table:
    """Every key of a shard of exact hashes but the smallest of each hash."""
    exact, keys = shard.column("exact").to_numpy(), shard.column("key").to_numpy()
    order = np.lexsort((keys, exact))
    exact, keys = exact[order], keys[order]
    later = np.zeros(len(keys), bool)
    later[1:] = exact[1:] == exact[:-1]
    return pa.table({"key": pa.array(keys[later], pa.int64())})


def _explode_bands(batch: pa.Table, dropped: list[Any], shards: int) -> pa.Table:
    """One row per (document, band): the band's bucket, its shard (bucket modulo ``shards``), the document's key
    and signature; documents whose key is in ``dropped`` (a list of none or one object ref of a sorted int64 array)
    left out.

    Leaving them out here, not in a map of its own, matters: a block of dropped documents only would leave that map
    with nothing to emit, and Ray Data then hands the shuffle an empty block without a schema, which its reduce
    cannot concatenate with the others. This map always returns its columns, rows or not.
    """
    if dropped:
        batch = _without_keys(batch, dropped)
    bands = batch.column("bands").combine_chunks()
    repeat = np.repeat(np.arange(len(batch)), np.diff(bands.offsets.to_numpy()))
    buckets = bands.flatten().to_numpy(zero_copy_only=False)
    return pa.table(
        {
            "bucket": pa.array(buckets, pa.int64()),
            "shard": pa.array(np.mod(buckets, shards), pa.int64()),
            "key": pa.array(batch.column("key").to_numpy()[repeat], pa.int64()),
            "signature": batch.column("signature").take(pa.array(repeat, pa.int64())),
        }
    )


def _bucket_links(group: pa.Table, threshold: float) -> pa.Table:
    """One band's bucket as (first, other) links: each document of a connected group of similar ones (signatures
    agreeing on at least ``threshold`` of the slots) linked to the group's smallest key.

    At most one link per document, however many of them are alike (a bucket of n copies gives n - 1 links, not
    n(n - 1)/2 pairs), and identical signatures are compared once: web text and replicated corpora put thousands
    of copies of one document into a bucket.
    """
    keys = group.column("key").to_numpy()
    if len(keys) < 2:
        return pa.table({"first": pa.array([], pa.int64()), "other": pa.array([], pa.int64())})
    matrix = np.stack([np.frombuffer(sig, dtype=np.uint32) for sig in group.column("signature").to_pylist()])
    distinct, which = np.unique(matrix, axis=0, return_inverse=True)
    which = which.reshape(-1)
    links_i, links_j = [], []
    for i in range(len(distinct) - 1):
        similar = np.flatnonzero((distinct[i + 1 :] == distinct[i]).mean(axis=1) >= threshold) + i + 1
        links_i += [i] * len(similar)
        links_j += similar.tolist()
    component = _components(len(distinct), np.asarray(links_i, np.int64), np.asarray(links_j, np.int64))[which]
    first = np.full(int(component.max()) + 1, np.iinfo(np.int64).max)
    np.minimum.at(first, component, keys)
    firsts = first[component]
    linked = keys != firsts
    return pa.table({"first": pa.array(firsts[linked], pa.int64()), "other": pa.array(keys[linked], pa.int64())})


def _shard_links(shard: pa.Table, threshold: float) -> pa.Table:
    """:func:`_bucket_links` of every bucket of a shard that holds more than one document."""
    buckets = shard.column("bucket").to_numpy()
    order = np.argsort(buckets, kind="stable")
    ordered = buckets[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    sizes = np.diff(np.append(starts, len(ordered)))
    many = sizes > 1
    links = [
        _bucket_links(shard.take(pa.array(order[start : start + size])), threshold)
        for start, size in zip(starts[many], sizes[many], strict=True)
    ]
    if not links:
        return pa.table({"first": pa.array([], pa.int64()), "other": pa.array([], pa.int64())})
    return pa.concat_tables(links)


def _contaminated_keys(batch: pa.Table) -> pa.Table:
    return pa.table({"key": batch.column("key").filter(batch.column("contaminated"))})


def _components(count: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The connected component of each of ``count`` nodes, given the edges ``a[k] - b[k]`` (scipy's)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(count, count))
    return connected_components(graph, directed=False)[1]


def _later_in_components(first: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Every key of the components that the links ``first - other`` make, but each component's smallest."""
    keys, index = np.unique(np.concatenate([first, other]), return_inverse=True)
    component = _components(len(keys), index[: len(first)], index[len(first) :])
    smallest = np.full(int(component.max()) + 1 if len(keys) else 0, np.iinfo(np.int64).max)
    np.minimum.at(smallest, component, keys)
    return keys[keys != smallest[component]]


def find_drops(documents: Any, settings: dict[str, Any], evaluation: np.ndarray | None, workers: int) -> dict[str, Any]:
    """Keys of the documents to drop for each reason: ``exact``, ``near`` (beyond the exact ones) and
    ``contaminated`` (train split only); each a sorted int64 array."""
    import ray
    from ray.data import ActorPoolStrategy

    refs = [ray.put(evaluation)] if evaluation is not None and len(evaluation) else []
    records = documents.map_batches(
        Fingerprints,
        fn_constructor_kwargs={"settings": settings, "evaluation": refs},
        compute=ActorPoolStrategy(min_size=1, max_size=workers),
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=1,
    ).materialize()
    empty = np.empty(0, np.int64)
    documents_count = records.count()
    exact = empty
    if settings["exact"]:
        shards = _shards(documents_count, workers)
        dups = (
            records.select_columns(["exact", "key"])
            .map_batches(
                _with_shard, batch_format="pyarrow", batch_size=None, fn_kwargs={"column": "exact", "shards": shards}
            )
            .groupby("shard", num_partitions=_partitions(documents_count, workers))
            .map_groups(_later_keys, batch_format="pyarrow")
        )
        exact = np.sort(_column(dups, "key"))
    near = empty
    if settings["near"]:
        # an exact duplicate's signature is its first's: the search needs the first only
        dropped = [ray.put(exact)] if len(exact) else []
        rows = (documents_count - len(exact)) * settings["bands"]
        links = (
            records.select_columns(["key", "bands", "signature"])
            .map_batches(
                _explode_bands,
                batch_format="pyarrow",
                batch_size=None,
                fn_kwargs={"dropped": dropped, "shards": _shards(rows, workers)},
            )
            .groupby("shard", num_partitions=_partitions(rows, workers))
            .map_groups(_shard_links, batch_format="pyarrow", fn_kwargs={"threshold": settings["threshold"]})
        )
        near = np.setdiff1d(_later_in_components(_column(links, "first"), _column(links, "other")), exact)
    contaminated = empty
    if refs:
        flagged = records.map_batches(_contaminated_keys, batch_format="pyarrow", batch_size=None)
        contaminated = np.setdiff1d(_column(flagged, "key"), np.union1d(exact, near))
    return {"exact": exact, "near": near, "contaminated": contaminated}


def _partitions(rows: int, workers: int) -> int:
    """Hash partitions of a groupby over ``rows`` rows: a few per worker, one per 100,000 rows beyond that (Ray
    Data's default of 200 costs more in tasks than small data needs)."""
    return max(2 * workers, min(200, rows // 100_000 + 1))


def _shards(rows: int, workers: int) -> int:
    """Shards of hashes for a grouped stage over ``rows`` rows: about SHARD_ROWS rows each, a few per worker at
    least."""
    return max(2 * workers, rows // SHARD_ROWS + 1)


def _column(dataset: Any, name: str) -> np.ndarray:
    """One int64 column of a dataset, gathered as arrays (not row by row)."""
    parts = [np.asarray(batch[name], np.int64) for batch in dataset.iter_batches(batch_size=None, batch_format="numpy")]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def _without_keys(batch: pa.Table, dropped: list[Any]) -> pa.Table:
    """The rows whose ``key`` is not in ``dropped`` (an object ref of a sorted int64 array)."""
    import ray

    keys = ray.get(dropped[0])
    row_keys = batch.column("key").to_numpy()
    position = np.minimum(np.searchsorted(keys, row_keys), len(keys) - 1)
    return batch.filter(pa.array(keys[position] != row_keys))


def drop_documents(batch: pa.Table, dropped: list[Any]) -> pa.Table:
    """Ray Data ``map_batches``: the batch without the documents whose keys are in ``dropped`` (an object ref of
    a sorted int64 array); file summary rows stay."""
    import ray

    keys = ray.get(dropped[0])
    if not len(keys):
        return batch
    row_keys = document_keys(batch.column("file_index").to_numpy(), batch.column("doc_index").to_numpy())
    position = np.minimum(np.searchsorted(keys, row_keys), len(keys) - 1)
    hit = (keys[position] == row_keys) & (batch.column("kind").to_numpy() == KIND_DOCUMENT)
    return batch.filter(pa.array(~hit))
