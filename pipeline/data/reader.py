"""Reading tokenized datasets: the stable API the Train stage uses.

Pretraining (``raygpt tokenize`` -> ``<run.dir>/data``)::

    manifest = load_manifest(run_dir)                 # or the data directory itself
    train = SequenceStore(manifest, "train")          # len(train) sequences of context_length + 1 ids
    batch = train.read(0, 8)                          # np.int64 array, shape (8, context_length + 1)
    inputs, targets = batch[:, :-1], batch[:, 1:]

Row ``i`` of a split is the same sequence for as long as the manifest is the same (``manifest.fingerprint``):
global row indices run over the split's shards in manifest order. A trainer that keeps its own seeded permutation
of ``range(len(store))`` and saves its position resumes exactly.

Fine-tuning (``raygpt tokenize-finetune`` -> ``<run.dir>/finetune_data``, splits ``train`` and ``heldout``)::

    manifest = load_manifest(run_dir, kind="finetune")
    examples = FinetuneStore(manifest, "train").read(0, 8)   # [(input_ids, loss_mask), ...]
    heldout = heldout_examples(manifest)                     # [{"prompt": ..., "completion": ...}, ...]

An example's ``input_ids`` are prompt ids + completion ids + ``<|endoftext|>`` (at most context_length + 1 ids).
``loss_mask[i]`` is True when id ``i`` is a completion id or the closing ``<|endoftext|>``: it is aligned with the
*targets*, so the loss is ``cross_entropy(model(input_ids[:-1]), input_ids[1:])`` weighted by ``loss_mask[1:]``.
``loss_mask[0]`` is always False (a prompt has at least one id).
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.errors import DataError
from pipeline.data.manifest import MANIFEST, Manifest, Shard, missing_shards, read_json
from pipeline.data.sources import open_input
from pipeline.layout import RunLayout


def load_manifest(location: str, kind: str | None = None) -> Manifest:
    """The manifest of the dataset at ``location``: a dataset directory, or a run directory (then its ``data/``,
    or ``finetune_data/`` when ``kind="finetune"``). Local path or URI.

    Raises DataError when there is no manifest, it is corrupt or of another kind, or a shard file is missing.
    """
    given = str(location)
    location = storage.resolve(given)
    data = read_json(location)
    if data is None:
        sub = RunLayout(given).dataset("finetune" if kind == "finetune" else "pretrain")
        location = storage.resolve(sub)
        data = read_json(location)
        if data is None:
            raise DataError(
                f"no dataset manifest at {storage.join(given, MANIFEST)} or {storage.join(sub, MANIFEST)}; "
                f"run `raygpt {'tokenize-finetune' if kind == 'finetune' else 'tokenize'}` first"
            )
    if kind is not None and data.get("kind") != kind:
        raise DataError(f"{storage.join(location, MANIFEST)} describes a {data.get('kind')} dataset, not {kind}")
    missing = missing_shards(location, data)
    if missing:
        raise DataError(f"dataset {location} is incomplete: {len(missing)} shard file(s) missing, e.g. {missing[0]}")
    return Manifest(location, data)


class _Rows:
    """Global row ranges over a split's shards, read one row group at a time (the last one is cached)."""

    def __init__(self, manifest: Manifest, split: str, columns: list[str]) -> None:
        if split not in manifest.splits:
            raise DataError(
                f"dataset {manifest.location} has no split {split!r} (splits: {', '.join(manifest.splits)})"
            )
        self.manifest = manifest
        self.split = split
        self.columns = columns
        self.shards: tuple[Shard, ...] = manifest.splits[split].shards
        self._starts = [0]
        for shard in self.shards:
            self._starts.append(self._starts[-1] + shard.rows)
        self._file_index = -1
        self._file: pq.ParquetFile | None = None
        self._groups: list[int] = []  # first row of each row group of the open shard (plus the end)
        self._cached: tuple[int, int, pa.Table] | None = None  # shard, row group, table

    def __len__(self) -> int:
        return self._starts[-1]

    def _open(self, index: int) -> pq.ParquetFile:
        if index != self._file_index:
            shard = self.shards[index]
            uri = self.manifest.shard_uri(shard)
            try:
                parquet = pq.ParquetFile(open_input(uri))
            except (pa.ArrowInvalid, OSError) as exc:
                raise DataError(f"{uri}: unreadable shard ({exc}); rebuild the dataset") from None
            if parquet.metadata.num_rows != shard.rows:
                raise DataError(
                    f"{uri}: {parquet.metadata.num_rows} rows, the manifest says {shard.rows}; rebuild the dataset"
                )
            self._file, self._file_index = parquet, index
            self._groups = [0]
            for group in range(parquet.metadata.num_row_groups):
                self._groups.append(self._groups[-1] + parquet.metadata.row_group(group).num_rows)
        assert self._file is not None
        return self._file

    def _group(self, shard: int, group: int) -> pa.Table:
        if self._cached is None or self._cached[:2] != (shard, group):
            table = self._open(shard).read_row_group(group, columns=self.columns)
            self._cached = (shard, group, table)
        return self._cached[2]

    def tables(self, start: int, stop: int) -> list[pa.Table]:
        """Rows [start, stop) as table pieces in order."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"rows [{start}, {stop}) out of range for {len(self)} rows of split {self.split!r}")
        pieces = []
        row = start
        while row < stop:
            shard = bisect.bisect_right(self._starts, row) - 1
            local = row - self._starts[shard]
            self._open(shard)
            group = bisect.bisect_right(self._groups, local) - 1
            table = self._group(shard, group)
            offset = local - self._groups[group]
            take = min(stop - row, self._groups[group + 1] - local)
            pieces.append(table.slice(offset, take))
            row += take
        return pieces


class SequenceStore:
    """Random access to the packed sequences of one split of a pretraining dataset.

    ``len(store)`` is the number of sequences; ``store.read(start, stop)`` returns rows [start, stop) as an
    ``np.int64`` array of shape ``(stop - start, context_length + 1)``, contiguous across shards in manifest order.
    Sequential and chunked reads are cheap (the current row group, 1024 rows, stays cached). Not thread-safe.
    """

    def __init__(self, manifest: Manifest, split: str = "train") -> None:
        if manifest.kind != "pretrain":
            raise DataError(f"dataset {manifest.location} is a {manifest.kind} dataset; use FinetuneStore")
        self.manifest = manifest
        self.split = split
        self.sequence_length = manifest.sequence_length
        self._rows = _Rows(manifest, split, ["tokens"])

    def __len__(self) -> int:
        return len(self._rows)

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.sequence_length), np.int64)
        position = 0
        for piece in self._rows.tables(start, stop):
            column = piece.column("tokens").combine_chunks()
            out[position : position + len(piece)] = column.flatten().to_numpy().reshape(-1, self.sequence_length)
            position += len(piece)
        return out


class FinetuneStore:
    """Random access to the examples of one split (``train`` or ``heldout``) of a fine-tuning dataset.

    ``read(start, stop)`` returns a list of ``(input_ids, loss_mask)``: ``np.int64`` and ``np.bool_`` arrays of the
    same variable length (at most context_length + 1); see the module docstring for the mask's alignment.
    """

    def __init__(self, manifest: Manifest, split: str = "train") -> None:
        if manifest.kind != "finetune":
            raise DataError(f"dataset {manifest.location} is a {manifest.kind} dataset; use SequenceStore")
        self.manifest = manifest
        self.split = split
        self._rows = _Rows(manifest, split, ["input_ids", "loss_mask"])

    def __len__(self) -> int:
        return len(self._rows)

    def read(self, start: int, stop: int) -> list[tuple[np.ndarray, np.ndarray]]:
        examples = []
        for piece in self._rows.tables(start, stop):
            for ids, mask in zip(
                piece.column("input_ids").to_pylist(), piece.column("loss_mask").to_pylist(), strict=True
            ):
                examples.append((np.asarray(ids, np.int64), np.asarray(mask, np.bool_)))
        return examples


def heldout_examples(manifest: Manifest, split: str = "heldout") -> list[dict[str, str]]:
    """The raw ``{"prompt", "completion"}`` strings of a fine-tuning split, in order (for exact-match scoring:
    compare the greedy completion of ``prompt`` with ``completion``)."""
    if manifest.kind != "finetune":
        raise DataError(f"dataset {manifest.location} is a {manifest.kind} dataset, not finetune")
    rows = _Rows(manifest, split, ["prompt", "completion"])
    examples = []
    for piece in rows.tables(0, len(rows)):
        for prompt, completion in zip(
            piece.column("prompt").to_pylist(), piece.column("completion").to_pylist(), strict=True
        ):
            examples.append({"prompt": prompt, "completion": completion})
    return examples


def ordered_execution_options() -> Any:
    """Ray Data ``ExecutionOptions`` that keep block order; pass them to Ray Train as
    ``DataConfig(execution_options=ordered_execution_options())``, because Train replaces a dataset's options."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(
        resource_limits=current.resource_limits,
        exclude_resources=current.exclude_resources,
        preserve_order=True,
        verbose_progress=current.verbose_progress,
    )


def _to_int64(batch: pa.Table) -> dict[str, np.ndarray]:
    column = batch.column("tokens").combine_chunks()
    return {"tokens": column.flatten().to_numpy().astype(np.int64).reshape(len(batch), -1)}


def ray_dataset(manifest: Manifest, split: str = "train") -> Any:
    """A Ray Dataset of one split with a ``tokens`` column (``np.int64``, shape ``(context_length + 1,)`` per row).

    Ordering guarantee: iterating the dataset itself (``iter_batches``, ``take``) yields exactly the rows of
    :class:`SequenceStore` in the same order (the dataset is created with ``preserve_order=True``). Ray Train
    replaces a dataset's execution options with its ``DataConfig``'s: pass
    ``DataConfig(execution_options=ordered_execution_options())`` to keep the order. Even then
    ``streaming_split`` (what ``get_dataset_shard`` uses) hands blocks to whichever worker asks first, so *which*
    worker sees a row is not deterministic; for an exact resume use :class:`SequenceStore` with your own
    permutation.
    """
    import ray
    from ray.data import DataContext

    if manifest.kind != "pretrain":
        raise DataError(f"dataset {manifest.location} is a {manifest.kind} dataset, not pretrain")
    if split not in manifest.splits:
        raise DataError(f"dataset {manifest.location} has no split {split!r}")
    paths = [manifest.shard_uri(shard) for shard in manifest.splits[split].shards]
    if not paths:
        raise DataError(f"split {split!r} of {manifest.location} has no sequences")
    context = DataContext.get_current()
    saved = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        dataset = ray.data.read_parquet(paths, columns=["tokens"], shuffle=None)
    finally:
        context.execution_options.preserve_order = saved
    return dataset.map_batches(_to_int64, batch_format="pyarrow", batch_size=None)
