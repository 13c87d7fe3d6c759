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

# the manifest's count of the documents curation dropped (or, ``flagged``, only counted) for each reason
REASONS = {
    "exact": "exact_duplicates",
    "near": "near_duplicates",
    "contaminated": "contaminated",
    "flagged": "contaminated_kept",
}
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


def _documents(config: PipelineConfig, inputs: list[dict[str, Any]]) -> Any:
    """The read stage: input files to document rows, in input order."""
    import ray
    from ray.data import DataContext

    data = config.data
    context = DataContext.get_current()
    saved = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # the dataset copies the context at creation
    try:
        files = ray.data.from_arrow(_file_groups(inputs, _num_tokenizers(config)))
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


def _dataset(config: PipelineConfig, inputs: list[dict[str, Any]], dropped: Any = None) -> Any:
    """Read, drop the curated-out documents (``dropped``: an object ref of their sorted keys), tokenize."""
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
        TokenizeDocuments,
        fn_constructor_kwargs={"tokenizer_name": data.tokenizer, "tokenizer_file": data.tokenizer_file},
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
) -> dict[str, Any]:
    data = config.data
    row_length = data.context_length + 1
    dtype = token_dtype(tokenizer.n_vocab)
    names = [source.name for source in data.source_list()]
    source_of = np.array([names.index(item.get("source", names[0])) for item in inputs], dtype=np.int64)
    # each source is packed on its own (a sequence never mixes sources) into <split>/ (one source) or
    # <split>/<source>/ shards
    packers = [[Packer(row_length, dtype) for _ in SPLITS] for _ in names]
    writers = [
        [ShardWriter(staging, split if len(names) == 1 else f"{split}/{name}", row_length, dtype, data.shard_sequences)
         for split in SPLITS]
        for name in names
    ]
    documents = [[0, 0] for _ in names]
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

    try:
        for batch in _dataset(config, inputs, dropped).iter_batches(batch_size=None, batch_format="pyarrow"):
            _consume(batch, source_of, packers, writers, documents, summaries)
    except Exception as exc:
        error = find_data_error(exc)
        if error is not None:
            raise error from None
        raise
    for source_packers, source_writers in zip(packers, writers, strict=True):
        for packer, writer in zip(source_packers, source_writers, strict=True):
            writer.write(packer.finish(data.pack_tail))
            writer.close()
    if len(summaries) != len(inputs):
        raise RuntimeError(f"internal error: read {len(summaries)} of {len(inputs)} input files")

    for name, source_packers in zip(names, packers, strict=True):
        if source_packers[0].sequences == 0:
            where = f"source {name!r}" if len(names) > 1 else "the corpus"
            raise DataError(
                f"{where} is too short: its train split has {source_packers[0].tokens:,} tokens, fewer than one "
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
            chosen = [packers[s][index] for s in which]
            out[split] = {
                "documents": sum(documents[s][index] for s in which),
                "tokens": sum(p.tokens for p in chosen),
                "sequences": sum(p.sequences for p in chosen),
                "dropped_tokens": sum(p.dropped_tokens for p in chosen),
                "wrapped_tokens": sum(p.wrapped_tokens for p in chosen),
                "shards": [shard for s in which for shard in writers[s][index].shards],
            }
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
    totals = {
        "files": len(inputs),
        "bytes": sum(int(r.get("bytes", 0)) for r in records),
        "documents": sum(map(sum, documents)),
        "tokens": sum(p.tokens for source_packers in packers for p in source_packers),
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
        "splits": split_stats(list(range(len(names)))),
        "sources": sources,
    }


def _consume(
    batch: pa.Table,
    source_of: np.ndarray,
    packers: list[list[Packer]],
    writers: list[list[ShardWriter]],
    documents: list[list[int]],
    summaries: dict[int, dict[str, Any]],
) -> None:
    kind = batch.column("kind").to_numpy()
    split = batch.column("split").to_numpy()
    source = source_of[batch.column("file_index").to_numpy()]
    tokens = batch.column("tokens")
    if isinstance(tokens, pa.ChunkedArray):
        tokens = tokens.combine_chunks()
    offsets = tokens.offsets.to_numpy()
    values = tokens.values.to_numpy(zero_copy_only=False)
    for row in np.flatnonzero(kind == KIND_FILE_SUMMARY):
        info = json.loads(batch.column("info")[int(row)].as_py())
        summaries[int(batch.column("file_index")[int(row)].as_py())] = info
    is_doc = kind == KIND_DOCUMENT
    for s, (source_packers, source_writers) in enumerate(zip(packers, writers, strict=True)):
        for index, packer in enumerate(source_packers):
            rows = np.flatnonzero(is_doc & (split == index) & (source == s))
            if len(rows) == 0:
                continue
            documents[s][index] += len(rows)
            # rows of one split are mostly contiguous runs; gather their ids in order
            starts, stops = offsets[rows], offsets[rows + 1]
            if len(rows) == rows[-1] - rows[0] + 1:
                ids = values[starts[0] : stops[-1]]
            else:
                ids = np.concatenate([values[a:b] for a, b in zip(starts, stops, strict=True)])
            source_writers[index].write(packer.feed(ids))
