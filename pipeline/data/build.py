"""``raygpt tokenize``: the pretraining corpus as packed, sharded sequences plus a manifest.

Ray Data pipeline: input files (one row each) -> read + clean (tasks, :mod:`documents`) -> tokenize (an actor pool,
:mod:`tokenize`) -> the driver streams the token rows *in input order* (``preserve_order``), packs each split's
stream into ``context_length + 1``-id rows and writes parquet shards into a staging directory. The manifest is
written last and the directory is moved into place (``<run.dir>/data``) only when complete.

Packing runs on the driver because it is inherently sequential (each row continues the previous document); it is a
memory copy, far cheaper than BPE encoding, which is what the actors parallelize.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.data.documents import KIND_DOCUMENT, KIND_FILE_SUMMARY, SPLITS, read_stage
from pipeline.data.errors import DataError, find_data_error
from pipeline.data.manifest import FORMAT, FORMAT_VERSION, MANIFEST, check_target, fingerprint
from pipeline.data.pack import Packer, ShardWriter
from pipeline.data.sources import discover
from pipeline.data.tokenize import TokenizeDocuments, token_dtype
from pipeline.layout import RunLayout
from pipeline.model.tokenizer import get_tokenizer
from pipeline.raycluster import connect

MIN_GROUP_BYTES = 1 << 20  # input bytes per read/tokenize task: at least (unless the corpus is smaller) ...
MAX_GROUP_BYTES = 8 << 20  # ... and at most (bounds the memory of a task and the wait for the first rows)


@dataclass
class BuildResult:
    location: str
    manifest: dict[str, Any]
    up_to_date: bool
    seconds: float

    def summary(self) -> str:
        if self.up_to_date:
            return f"{self.location} is up to date (same inputs and settings): nothing to do"
        totals = self.manifest["totals"]
        splits = self.manifest["splits"]
        mb = totals["bytes"] / 1e6
        parts = [
            f"{totals['documents']:,} documents",
            f"{totals['tokens']:,} tokens",
            f"{sum(s['sequences'] for s in splits.values()):,} sequences "
            f"(train {splits['train']['sequences']:,}, val {splits['val']['sequences']:,})",
            f"{mb:.1f} MB in {self.seconds:.1f} s = {mb / max(self.seconds, 1e-9):.2f} MB/s",
        ]
        skipped = totals["skipped_documents"] + totals["skipped_files"]
        if skipped or totals["replaced_chars"]:
            parts.append(
                f"skipped {totals['skipped_documents']} empty documents and {totals['skipped_files']} binary files, "
                f"replaced {totals['replaced_chars']} bad characters"
            )
        return "tokenized: " + ", ".join(parts) + f" -> {self.location}"


def _identity(config: PipelineConfig, tokenizer_info: dict[str, Any], inputs: list[dict[str, Any]]) -> dict[str, Any]:
    data = config.data
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "pretrain",
        "tokenizer": tokenizer_info,
        "context_length": data.context_length,
        "settings": {
            "context_length": data.context_length,
            "text_field": data.text_field,
            "txt_document": data.txt_document,
            "bad_utf8": data.bad_utf8,
            "skip_binary": data.skip_binary,
            "val_fraction": data.val_fraction,
            "pack_tail": data.pack_tail,
            "shard_sequences": data.shard_sequences,
        },
        "inputs": [{k: v for k, v in item.items() if k != "index"} for item in inputs],
    }


def _num_tokenizers(config: PipelineConfig) -> int:
    if config.data.num_tokenizers:
        return config.data.num_tokenizers
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def tokenize_corpus(
    config: PipelineConfig,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    replace_changed: bool = False,
) -> BuildResult:
    """Build (or confirm) ``<run.dir>/data`` from ``data.inputs``. Raises DataError for bad input, and for a
    different dataset already there unless ``overwrite`` or ``replace_changed`` (see ``check_target``)."""
    started = time.perf_counter()
    data = config.data
    tokenizer = get_tokenizer(data.tokenizer, data.tokenizer_file)
    files, ignored = discover(data.inputs)
    inputs = [{"index": i, **f.to_dict()} for i, f in enumerate(files)]
    identity = _identity(config, tokenizer.info(), inputs)
    key = fingerprint(identity)
    location = RunLayout.of(config).data
    if check_target(location, identity, key, overwrite, replace_changed):
        return BuildResult(location, {}, True, time.perf_counter() - started)
    if ignored:
        log(f"ignoring {len(ignored)} files that are not .txt/.jsonl/.parquet (e.g. {ignored[0]})")

    connect(config.run)
    started = time.perf_counter()  # throughput counts the pipeline, not the start of a local Ray
    with storage.Staged(location, last=MANIFEST) as staging:
        manifest = _build(config, tokenizer, inputs, identity, key, staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    val = manifest["splits"]["val"]
    if data.val_fraction > 0 and val["sequences"] == 0:
        log(
            f"warning: the val split has {val['documents']} documents and no full sequence; validation will have "
            "nothing to evaluate (more or longer documents, or a larger data.val_fraction, fix that)"
        )
    return BuildResult(location, manifest, False, time.perf_counter() - started)


def _file_groups(inputs: list[dict[str, Any]], workers: int) -> list[pa.Table]:
    """Consecutive input files grouped into blocks of about total / (4 * workers) bytes (1 MB to 8 MB): one task
    each, few enough that per-task overhead stays small, enough that every actor has work until the end."""
    target = min(max(sum(i["size"] for i in inputs) / (4 * workers), MIN_GROUP_BYTES), MAX_GROUP_BYTES)
    groups: list[list[dict[str, Any]]] = [[]]
    size = 0
    for item in inputs:
        if groups[-1] and size + item["size"] > target:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item["size"]
    return [
        pa.table(
            {
                "file_index": pa.array([i["index"] for i in group], pa.int32()),
                "uri": [i["uri"] for i in group],
                "rel": [i["rel"] for i in group],
                "kind": [i["kind"] for i in group],
            }
        )
        for group in groups
    ]


def _dataset(config: PipelineConfig, inputs: list[dict[str, Any]]) -> Any:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    data = config.data
    context = DataContext.get_current()
    saved = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # the dataset copies the context at creation
    workers = _num_tokenizers(config)
    try:
        files = ray.data.from_arrow(_file_groups(inputs, workers))
    finally:
        context.execution_options.preserve_order = saved
    documents = files.map_batches(
        read_stage,
        batch_size=None,
        batch_format="numpy",
        fn_kwargs={
            "text_field": data.text_field,
            "txt_document": data.txt_document,
            "bad_utf8": data.bad_utf8,
            "skip_binary": data.skip_binary,
            "val_fraction": data.val_fraction,
        },
    )
    # a configured pool size is a fixed pool (all actors start at once); otherwise grow with the work, up to one
    # actor per CPU of the cluster
    pool = ActorPoolStrategy(size=workers) if data.num_tokenizers else ActorPoolStrategy(min_size=1, max_size=workers)
    return documents.map_batches(
        TokenizeDocuments,
        fn_constructor_kwargs={"tokenizer_name": data.tokenizer, "tokenizer_file": data.tokenizer_file},
        compute=pool,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=1,
    )


def _build(
    config: PipelineConfig,
    tokenizer: Any,
    inputs: list[dict[str, Any]],
    identity: dict[str, Any],
    key: str,
    staging: Path,
) -> dict[str, Any]:
    data = config.data
    row_length = data.context_length + 1
    dtype = token_dtype(tokenizer.n_vocab)
    packers = [Packer(row_length, dtype) for _ in SPLITS]
    writers = [ShardWriter(staging, name, row_length, dtype, data.shard_sequences) for name in SPLITS]
    documents = [0, 0]
    summaries: dict[int, dict[str, Any]] = {}

    try:
        for batch in _dataset(config, inputs).iter_batches(batch_size=None, batch_format="pyarrow"):
            _consume(batch, packers, writers, documents, summaries)
    except Exception as exc:
        error = find_data_error(exc)
        if error is not None:
            raise error from None
        raise
    for packer, writer in zip(packers, writers, strict=True):
        writer.write(packer.finish(data.pack_tail))
        writer.close()
    if len(summaries) != len(inputs):
        raise RuntimeError(f"internal error: read {len(summaries)} of {len(inputs)} input files")

    if packers[0].sequences == 0:
        raise DataError(
            f"the corpus is too short: the train split has {packers[0].tokens:,} tokens, fewer than one sequence of "
            f"context_length + 1 = {row_length} tokens (add text, lower data.context_length or data.val_fraction)"
        )
    records = []
    for item in inputs:
        summary = summaries[item["index"]]
        records.append({k: v for k, v in item.items() if k != "index"} | summary)
    splits = {}
    for index, name in enumerate(SPLITS):
        packer = packers[index]
        splits[name] = {
            "documents": documents[index],
            "tokens": packer.tokens,
            "sequences": packer.sequences,
            "dropped_tokens": packer.dropped_tokens,
            "wrapped_tokens": packer.wrapped_tokens,
            "shards": writers[index].shards,
        }
    totals = {
        "files": len(inputs),
        "bytes": sum(int(r.get("bytes", 0)) for r in records),
        "documents": sum(documents),
        "tokens": sum(p.tokens for p in packers),
        "skipped_documents": sum(int(r["skipped_documents"]) for r in records),
        "skipped_files": sum(1 for r in records if r["skipped_binary"]),
        "replaced_chars": sum(int(r["replaced_chars"]) for r in records),
        "files_with_replacements": sum(1 for r in records if r["replaced_chars"]),
    }
    return {
        **{k: v for k, v in identity.items() if k != "inputs"},
        "fingerprint": key,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "sequence_length": row_length,
        "dtype": dtype.name,
        "inputs": records,
        "totals": totals,
        "splits": splits,
    }


def _consume(
    batch: pa.Table,
    packers: list[Packer],
    writers: list[ShardWriter],
    documents: list[int],
    summaries: dict[int, dict[str, Any]],
) -> None:
    kind = batch.column("kind").to_numpy()
    split = batch.column("split").to_numpy()
    tokens = batch.column("tokens")
    if isinstance(tokens, pa.ChunkedArray):
        tokens = tokens.combine_chunks()
    offsets = tokens.offsets.to_numpy()
    values = tokens.values.to_numpy(zero_copy_only=False)
    for row in np.flatnonzero(kind == KIND_FILE_SUMMARY):
        info = json.loads(batch.column("info")[int(row)].as_py())
        summaries[int(batch.column("file_index")[int(row)].as_py())] = info
    is_doc = kind == KIND_DOCUMENT
    for index, packer in enumerate(packers):
        rows = np.flatnonzero(is_doc & (split == index))
        if len(rows) == 0:
            continue
        documents[index] += len(rows)
        # rows of one split are mostly contiguous runs; gather their ids in order
        starts, stops = offsets[rows], offsets[rows + 1]
        if len(rows) == rows[-1] - rows[0] + 1:
            ids = values[starts[0] : stops[-1]]
        else:
            ids = np.concatenate([values[a:b] for a, b in zip(starts, stops, strict=True)])
        writers[index].write(packer.feed(ids))
