"""``raygpt tokenize``: the pretraining corpus as packed, sharded sequences plus a manifest.

Ray Data pipeline: input files (grouped into tasks of a few MB) -> read + clean (tasks, :mod:`documents`) ->
tokenize, pack and write shards (an actor pool, :class:`pipeline.data.pack.TokenizeAndPack`) -> the driver
receives one small row per block and stream (counts, shard list, and the block's tail of fewer than one row of
ids), in input order (``preserve_order``), packs the tails into the last rows of each split and writes the
manifest. Token rows never reach the driver, so its memory does not grow with the corpus. Everything is written
into a staging directory (an object store: the new version's prefix) and published only when complete, manifest
last.

A split's rows are each block's full rows, block after block, then the rows of the tails; blocks are the task
groups of :func:`_file_groups`, which depend on the inputs alone, so the dataset does not depend on the number of
actors or nodes.
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
from pipeline.data.pack import ShardWriter, TailPacker, TokenizeAndPack
from pipeline.data.sources import discover
from pipeline.data.tokenize import token_dtype
from pipeline.layout import RunLayout
from pipeline.model.tokenizer import get_tokenizer
from pipeline.raycluster import connect

# the manifest's count of the documents curation dropped (or, ``flagged``, only counted) for each reason
REASONS = {
    "exact": "exact_duplicates",
    "near": "near_duplicates",
    "contaminated": "contaminated",
    "flagged": "contaminated_kept",
}
MIN_GROUP_BYTES = 1 << 20  # input bytes per read/tokenize task: at least (unless the corpus is smaller) ...
MAX_GROUP_BYTES = 8 << 20  # ... and at most (bounds the memory of a task and the wait for the first rows)
GROUPS = 16  # ... and otherwise the corpus in this many tasks, so that a pool of a few actors stays busy


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
        curated = [f"{totals[field]:,} {field.replace('_', ' ')}" for field in REASONS.values() if field in totals]
        if curated:
            parts.append("curation: " + ", ".join(curated))
        skipped = totals["skipped_documents"] + totals["skipped_files"]
        if skipped or totals["replaced_chars"]:
            parts.append(
                f"skipped {totals['skipped_documents']} empty documents and {totals['skipped_files']} binary files, "
                f"replaced {totals['replaced_chars']} bad characters"
            )
        return "tokenized: " + ", ".join(parts) + f" -> {self.location}"


def _identity(config: PipelineConfig, tokenizer_info: dict[str, Any], inputs: list[dict[str, Any]]) -> dict[str, Any]:
    data = config.data
    total = sum(source.weight for source in data.sources)
    identity = {
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
    # one source (data.inputs) and no curation keep the identity a dataset always had
    if data.sources:
        identity["blend"] = [{"name": s.name, "weight": s.weight / total} for s in data.sources]
    settings = curation(config)
    if settings:
        identity["curation"] = settings
    return identity


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
    inputs, ignored = _inputs(config)
    identity = _identity(config, tokenizer.info(), inputs)
    key = fingerprint(identity)
    location = RunLayout.of(config).data
    if check_target(location, identity, key, overwrite, replace_changed):
        return BuildResult(location, {}, True, time.perf_counter() - started)
    if ignored:
        log(f"ignoring {len(ignored)} files that are not .txt/.jsonl/.parquet (e.g. {ignored[0]})")

    connect(config.run)
    started = time.perf_counter()  # throughput counts the pipeline, not the start of a local Ray
    publish = storage.Staged(location, last=MANIFEST)
    with publish as staging:
        manifest = _build(config, tokenizer, inputs, identity, key, staging, publish.shared)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    val = manifest["splits"]["val"]
    if data.val_fraction > 0 and val["sequences"] == 0:
        log(
            f"warning: the val split has {val['documents']} documents and no full sequence; validation will have "
            "nothing to evaluate (more or longer documents, or a larger data.val_fraction, fix that)"
        )
    return BuildResult(location, manifest, False, time.perf_counter() - started)


def _inputs(config: PipelineConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """Every input file, source after source (each tagged with its source when data.sources names several), and
    the paths ignored for their extension."""
    sources = config.data.source_list()
    inputs: list[dict[str, Any]] = []
    ignored: list[str] = []
    for source in sources:
        try:
            files, skipped = discover(source.inputs)
        except DataError as exc:
            raise DataError(f"data.sources {source.name!r}: {exc}" if config.data.sources else str(exc)) from None
        ignored += skipped
        for file in files:
            tag = {"source": source.name} if config.data.sources else {}
            inputs.append({"index": len(inputs), **file.to_dict(), **tag})
    return inputs, ignored


def _file_groups(inputs: list[dict[str, Any]]) -> list[pa.Table]:
    """Consecutive input files grouped into blocks of about 1/GROUPS of the corpus (1 MB to 8 MB): one task each,
    few enough that per-task overhead stays small, enough that every actor has work until the end. The grouping
    depends on the inputs alone: a block is packed on its own, so it decides which ids share a row."""
    target = min(max(sum(i["size"] for i in inputs) / GROUPS, MIN_GROUP_BYTES), MAX_GROUP_BYTES)
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


def _documents(config: PipelineConfig, inputs: list[dict[str, Any]]) -> Any:
    """The read stage: input files to document rows, in input order."""
    import ray
    from ray.data import DataContext

    data = config.data
    context = DataContext.get_current()
    saved = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # the dataset copies the context at creation
    try:
        files = ray.data.from_arrow(_file_groups(inputs))
    finally:
        context.execution_options.preserve_order = saved
    return files.map_batches(
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


def _dataset(config: PipelineConfig, inputs: list[dict[str, Any]], pack: dict[str, Any], dropped: Any = None) -> Any:
    """Read, drop the curated-out documents (``dropped``: an object ref of their sorted keys), tokenize and pack
    (``pack``: :class:`TokenizeAndPack`'s settings)."""
    from ray.data import ActorPoolStrategy

    from pipeline.data.curate import drop_documents

    data = config.data
    workers = _num_tokenizers(config)
    documents = _documents(config, inputs)
    if dropped is not None:
        documents = documents.map_batches(
            drop_documents, batch_size=None, batch_format="pyarrow", fn_kwargs={"dropped": [dropped]}
        )
    # a configured pool size is a fixed pool (all actors start at once); otherwise grow with the work, up to one
    # actor per CPU of the cluster
    pool = ActorPoolStrategy(size=workers) if data.num_tokenizers else ActorPoolStrategy(min_size=1, max_size=workers)
    return documents.map_batches(
        TokenizeAndPack,
        fn_constructor_kwargs={"tokenizer_name": data.tokenizer, "tokenizer_file": data.tokenizer_file, **pack},
        compute=pool,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=1,
    )


def curation(config: PipelineConfig) -> dict[str, Any] | None:
    """The curation settings that define the dataset (None when none is on): dedup's, and decontamination's with
    the sha256 of every evaluation file."""
    data = config.data
    settings: dict[str, Any] = {}
    if data.dedup.exact or data.dedup.near:
        settings["dedup"] = data.dedup.model_dump()
    if data.decontaminate is not None:
        from pipeline.eval.tasks import DATA_DIR

        against = data.decontaminate.against
        if against is None:
            against = [*config.finetune.eval_inputs, *sorted(str(p) for p in DATA_DIR.glob("*.jsonl"))]
        files = []
        for path in against:
            if not Path(path).is_file():
                raise DataError(f"data.decontaminate.against: {path} is not a file")
            files.append({"path": str(Path(path).resolve()), "sha256": storage.file_sha256(Path(path))})
        settings["decontaminate"] = {**data.decontaminate.model_dump(exclude={"against"}), "against": files}
    return settings or None


def _drops(config: PipelineConfig, inputs: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """What curation drops: the keys for each reason (see :func:`pipeline.data.curate.find_drops`)."""
    from pipeline.data.curate import evaluation_ngrams, find_drops

    dedup = settings.get("dedup", {"exact": False, "near": False})
    decontaminate = settings.get("decontaminate")
    evaluation = None
    if decontaminate is not None:
        evaluation = evaluation_ngrams([f["path"] for f in decontaminate["against"]], decontaminate["ngram"])
    knobs = {
        **{k: dedup.get(k, v) for k, v in {"threshold": 0.8, "num_perm": 128, "bands": 16, "ngram": 5}.items()},
        "exact": dedup["exact"],
        "near": dedup["near"],
        "seed": 1,  # fixed: the same documents are near duplicates whatever run.seed
        "contamination_ngram": decontaminate["ngram"] if decontaminate else 13,
    }
    drops = find_drops(_documents(config, inputs), knobs, evaluation, _num_tokenizers(config))
    if decontaminate is not None and decontaminate["action"] == "flag":
        drops["flagged"] = drops.pop("contaminated")
    return drops


def _build(
    config: PipelineConfig,
    tokenizer: Any,
    inputs: list[dict[str, Any]],
    identity: dict[str, Any],
    key: str,
    staging: Path,
    shared: str,
) -> dict[str, Any]:
    data = config.data
    row_length = data.context_length + 1
    dtype = token_dtype(tokenizer.n_vocab)
    names = [source.name for source in data.source_list()]
    source_of = np.array([names.index(item.get("source", names[0])) for item in inputs], dtype=np.int64)
    # each source is packed on its own (a sequence never mixes sources) into <split>/ (one source) or
    # <split>/<source>/ shards
    dirs = [[split if len(names) == 1 else f"{split}/{name}" for split in SPLITS] for name in names]
    streams = [
        [_Stream(row_length, dtype, str(staging), directory, data.shard_sequences) for directory in d] for d in dirs
    ]
    summaries: dict[int, dict[str, Any]] = {}
    drops: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    dropped = None
    if identity.get("curation"):
        import ray

        from pipeline.data.curate import file_of

        drops = _drops(config, inputs, identity["curation"])
        removed = [keys for reason, keys in drops.items() if reason != "flagged"]
        dropped = ray.put(np.unique(np.concatenate(removed)) if removed else np.empty(0, np.int64))
        counts = {reason: np.bincount(source_of[file_of(keys)], minlength=len(names)) for reason, keys in drops.items()}

    pack = {
        "root": shared,
        "row_length": row_length,
        "shard_rows": data.shard_sequences,
        "source_of": source_of.tolist(),
        "stream_dirs": dirs,
    }
    try:
        for batch in _dataset(config, inputs, pack, dropped).iter_batches(batch_size=None, batch_format="pyarrow"):
            _collect(batch, streams, summaries)
    except Exception as exc:
        error = find_data_error(exc)
        if error is not None:
            raise error from None
        raise
    for source_streams in streams:
        for stream in source_streams:
            stream.finish(data.pack_tail)
    if len(summaries) != len(inputs):
        raise RuntimeError(f"internal error: read {len(summaries)} of {len(inputs)} input files")

    for name, source_streams in zip(names, streams, strict=True):
        train = source_streams[0].stats()
        if train["sequences"] == 0:
            where = f"source {name!r}" if len(names) > 1 else "the corpus"
            raise DataError(
                f"{where} is too short: its train split has {train['tokens']:,} tokens, fewer than one "
                f"sequence of context_length + 1 = {row_length} tokens (add text, lower data.context_length or "
                "data.val_fraction)"
            )
    records = []
    for item in inputs:
        summary = summaries[item["index"]]
        records.append({k: v for k, v in item.items() if k != "index"} | summary)

    def split_stats(which: list[int]) -> dict[str, Any]:
        out = {}
        for index, split in enumerate(SPLITS):
            chosen = [streams[s][index].stats() for s in which]
            out[split] = {
                field: sum(stats[field] for stats in chosen)
                for field in ("documents", "tokens", "sequences", "dropped_tokens", "wrapped_tokens")
            } | {"shards": [shard for stats in chosen for shard in stats["shards"]]}
        return out

    weights = {b["name"]: b["weight"] for b in identity.get("blend", [{"name": names[0], "weight": 1.0}])}
    sources = {}
    for s, name in enumerate(names):
        stats = split_stats([s])
        sources[name] = {
            "weight": weights[name],
            "files": int((source_of == s).sum()),
            "documents": sum(split["documents"] for split in stats.values()),
            "tokens": sum(split["tokens"] for split in stats.values()),
            "splits": stats,
        }
        for reason, field in REASONS.items():
            if reason in drops:
                sources[name][field] = int(counts[reason][s])
    splits = split_stats(list(range(len(names))))
    totals = {
        "files": len(inputs),
        "bytes": sum(int(r.get("bytes", 0)) for r in records),
        "documents": sum(split["documents"] for split in splits.values()),
        "tokens": sum(split["tokens"] for split in splits.values()),
        "skipped_documents": sum(int(r["skipped_documents"]) for r in records),
        "skipped_files": sum(1 for r in records if r["skipped_binary"]),
        "replaced_chars": sum(int(r["replaced_chars"]) for r in records),
        "files_with_replacements": sum(1 for r in records if r["replaced_chars"]),
    }
    totals.update({field: len(drops[reason]) for reason, field in REASONS.items() if reason in drops})
    return {
        **{k: v for k, v in identity.items() if k != "inputs"},
        "fingerprint": key,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "sequence_length": row_length,
        "dtype": dtype.name,
        "inputs": records,
        "totals": totals,
        # a split's shards: every source's, source after source (a blended order addresses them by offset)
        "splits": splits,
        "sources": sources,
    }


class _Stream:
    """The driver's view of one (source, split) stream: the blocks' counts and shards in input order, and the
    rows of their tails (written by this process into ``staging``)."""

    def __init__(self, row_length: int, dtype: np.dtype, staging: str, directory: str, shard_rows: int) -> None:
        self.tails = TailPacker(row_length, dtype)
        self.writer = ShardWriter(staging, directory, row_length, dtype, shard_rows, prefix="shard-tails")
        self.documents = 0
        self.block_shards: list[dict[str, Any]] = []

    def add(self, documents: int, tokens: int, rows: int, shards: list[dict[str, Any]], head: Any, tail: Any) -> None:
        self.documents += documents
        self.block_shards += shards
        self.writer.write(self.tails.add(tokens, rows, head, tail))

    def finish(self, pack_tail: str) -> None:
        self.writer.write(self.tails.finish(pack_tail))
        self.writer.close()

    def stats(self) -> dict[str, Any]:
        return {"documents": self.documents, **self.tails.stats, "shards": self.block_shards + self.writer.shards}


def _collect(batch: pa.Table, streams: list[list[_Stream]], summaries: dict[int, dict[str, Any]]) -> None:
    """One batch of :class:`TokenizeAndPack` rows into the streams and the file summaries."""
    kind = batch.column("kind").to_numpy()
    file_index = batch.column("file_index").to_numpy()
    info = batch.column("info")
    for row in np.flatnonzero(kind == KIND_FILE_SUMMARY):
        summaries[int(file_index[row])] = json.loads(info[int(row)].as_py())
    columns = {name: batch.column(name) for name in ("source", "split", "documents", "tokens", "rows", "shards")}
    head, tail = batch.column("head"), batch.column("tail")
    for row in np.flatnonzero(kind == KIND_DOCUMENT):
        r = int(row)
        values = {name: column[r].as_py() for name, column in columns.items()}
        streams[values["source"]][values["split"]].add(
            values["documents"],
            values["tokens"],
            values["rows"],
            json.loads(values["shards"]),
            head[r].values.to_numpy(zero_copy_only=False),
            tail[r].values.to_numpy(zero_copy_only=False),
        )
