"""Input files to document rows (the read stage of the Ray Data pipeline), with the deterministic train/val split.

One call handles one input file and yields pyarrow tables of rows in file order:

- ``kind=0`` a document: ``text`` is the cleaned text, ``split`` 0 (train) or 1 (val), ``doc_index`` its position
  in the file (txt: block/line number from 0, jsonl: line number from 1, parquet: row number from 0);
- ``kind=2`` one summary row per file, last: ``text`` is a JSON object with the file's ``sha256``, ``bytes``,
  ``documents``, ``skipped_documents`` (empty after cleaning), ``replaced_chars`` (bad UTF-8) and
  ``skipped_binary``.

A document's split comes from a hash of its identity, ``<file identity>#<doc_index>`` (see
:func:`is_validation`), so it never depends on other files, the order of inputs or the number of workers.

A file is streamed: txt and jsonl in blocks of ``READ_BLOCK_BYTES`` (decoded and split into documents as they
come), parquet through a random-access file, ``PARQUET_BUFFER_BYTES`` of its text column at a time and decoded
``ROWS_PER_CHUNK`` rows at a time; document rows go out in tables of at most ``ROWS_PER_CHUNK`` rows and
``CHUNK_CHARS`` characters. The memory of one call is therefore bounded by those sizes and the longest document (a
txt file with ``txt_document=file`` is one document), whatever the size of the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import clean
from pipeline.data.errors import DataError
from pipeline.data.sources import open_input, read_blocks

KIND_DOCUMENT = 0
KIND_FILE_SUMMARY = 2
TRAIN, VAL = 0, 1
SPLITS = ("train", "val")
ROWS_PER_CHUNK = 4096
CHUNK_CHARS = 8 << 20  # a table of document rows holds at most this many characters (unless one document does)
READ_BLOCK_BYTES = 1 << 20  # txt and jsonl files are read and decoded this many bytes at a time
PARQUET_BUFFER_BYTES = 1 << 20  # parquet column chunks are read this many bytes at a time
DOCUMENT_SCHEMA = pa.schema(
    [
        ("file_index", pa.int32()),
        ("doc_index", pa.int64()),
        ("split", pa.int8()),
        ("kind", pa.int8()),
        ("text", pa.large_string()),
    ]
)


def is_validation(identity: str, val_fraction: float) -> bool:
    """Whether the document with this identity belongs to the validation split (stable across runs and hosts)."""
    if val_fraction <= 0:
        return False
    digest = hashlib.sha256(identity.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


class _Chunker:
    """Accumulates document rows of one file and hands them out as tables of at most ROWS_PER_CHUNK rows."""

    def __init__(self, file_index: int, rel: str, val_fraction: float) -> None:
        self.file_index = file_index
        self.rel = rel
        self.val_fraction = val_fraction
        self.doc_index: list[int] = []
        self.split: list[int] = []
        self.text: list[str] = []
        self.chars = 0
        self.documents = 0
        self.skipped = 0

    def add(self, index: int, raw: str | None) -> None:
        text = clean.normalize(raw) if raw else ""
        if not text:
            self.skipped += 1
            return
        self.documents += 1
        self.doc_index.append(index)
        self.split.append(VAL if is_validation(f"{self.rel}#{index}", self.val_fraction) else TRAIN)
        self.text.append(text)
        self.chars += len(text)

    def full(self) -> bool:
        return len(self.text) >= ROWS_PER_CHUNK or self.chars >= CHUNK_CHARS

    def take(self) -> pa.Table:
        count = len(self.text)
        table = pa.table(
            {
                "file_index": np.full(count, self.file_index, np.int32),
                "doc_index": np.asarray(self.doc_index, np.int64),
                "split": np.asarray(self.split, np.int8),
                "kind": np.full(count, KIND_DOCUMENT, np.int8),
                "text": pa.array(self.text, pa.large_string()),
            },
            schema=DOCUMENT_SCHEMA,
        )
        self.doc_index, self.split, self.text, self.chars = [], [], [], 0
        return table

    def summary(self, info: dict[str, Any]) -> pa.Table:
        info = {**info, "documents": self.documents, "skipped_documents": self.skipped}
        return pa.table(
            {
                "file_index": np.asarray([self.file_index], np.int32),
                "doc_index": np.asarray([-1], np.int64),
                "split": np.asarray([-1], np.int8),
                "kind": np.asarray([KIND_FILE_SUMMARY], np.int8),
                "text": pa.array([json.dumps(info, sort_keys=True)], pa.large_string()),
            },
            schema=DOCUMENT_SCHEMA,
        )


def file_documents(
    file_index: int,
    uri: str,
    rel: str,
    kind: str,
    *,
    text_field: str,
    txt_document: str,
    bad_utf8: str,
    skip_binary: bool,
    val_fraction: float,
) -> Iterator[pa.Table]:
    """Document rows of one input file, in file order, then its summary row. Errors name the file (and line)."""
    chunker = _Chunker(file_index, rel, val_fraction)
    info: dict[str, Any] = {"replaced_chars": 0, "skipped_binary": False}
    if kind == "parquet":
        yield from _parquet_documents(chunker, uri, text_field, info)
    else:
        if skip_binary:
            # a NUL byte anywhere skips the whole file, so look before the first document goes out
            probe = clean.StreamDecoder(read_blocks(uri, READ_BLOCK_BYTES), uri, bad_utf8)
            if probe.skim():
                info.update(bytes=probe.size, sha256=probe.sha256, skipped_binary=True)
                yield chunker.summary(info)
                return
        stream = clean.StreamDecoder(read_blocks(uri, READ_BLOCK_BYTES), uri, bad_utf8)
        if kind == "jsonl":
            pieces: Any = clean.jsonl_line_texts(clean.split_lines(stream.texts()), uri, text_field)
        else:
            pieces = enumerate(clean.txt_documents(stream.texts(), txt_document))
        try:
            for index, raw in pieces:
                chunker.add(index, raw)
                if chunker.full():
                    yield chunker.take()
        except clean.BinaryFileError:
            raise
        except DataError as error:
            raise stream.outranking(error) from None
        info.update(bytes=stream.size, sha256=stream.sha256, replaced_chars=stream.replaced)
    if chunker.text:
        yield chunker.take()
    yield chunker.summary(info)


def _parquet_documents(chunker: _Chunker, uri: str, field: str, info: dict[str, Any]) -> Iterator[pa.Table]:
    # the digest takes a sequential pass of its own: the parquet reader reads the footer first, then row groups
    digest = hashlib.sha256()
    size = 0
    for block in read_blocks(uri, READ_BLOCK_BYTES):
        digest.update(block)
        size += len(block)
    info["bytes"] = size
    info["sha256"] = digest.hexdigest()
    with open_input(uri) as handle:
        try:
            parquet = pq.ParquetFile(handle, buffer_size=PARQUET_BUFFER_BYTES, pre_buffer=False)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{uri}: not a readable parquet file ({exc})") from None
        names = parquet.schema_arrow.names
        if field not in names:
            raise DataError(f"{uri}: no column {field!r} (columns: {', '.join(names)}); set data.text_field")
        column_type = parquet.schema_arrow.field(field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise DataError(f"{uri}: column {field!r} has type {column_type}, expected a string column")
        index = 0
        for batch in parquet.iter_batches(columns=[field], batch_size=ROWS_PER_CHUNK):
            for value in batch.column(0).to_pylist():
                chunker.add(index, value)
                index += 1
                if chunker.full():
                    yield chunker.take()


def read_stage(batch: dict[str, np.ndarray], **settings: Any) -> Iterator[pa.Table]:
    """Ray Data ``map_batches`` function: a batch of input-file rows to document rows (one file at a time)."""
    for position in range(len(batch["uri"])):
        yield from file_documents(
            int(batch["file_index"][position]),
            str(batch["uri"][position]),
            str(batch["rel"][position]),
            str(batch["kind"][position]),
            **settings,
        )
