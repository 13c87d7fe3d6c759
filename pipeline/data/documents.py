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
    """Whether the document with this identity belongs to the validation split (stable across runs and hosts): the
    first 8 bytes of its SHA-256, as a big-endian integer over 2**64, fall below ``val_fraction``."""
    return bool(_validation([identity], val_fraction)[0])


def validation_mask(prefix: str, indices: list[int], val_fraction: float) -> np.ndarray:
    """:func:`is_validation` of ``f"{prefix}{index}"`` for each index, as a bool array."""
    return _validation([f"{prefix}{index}" for index in indices], val_fraction)


def _validation(identities: list[str], val_fraction: float) -> np.ndarray:
    if val_fraction <= 0 or not identities:
        return np.zeros(len(identities), bool)
    digests = b"".join([hashlib.sha256(identity.encode("utf-8")).digest()[:8] for identity in identities])
    return np.frombuffer(digests, ">u8") / 2.0**64 < val_fraction


class _Chunker:
    """Accumulates document rows of one file and hands them out as tables of ROWS_PER_CHUNK rows or CHUNK_CHARS
    characters, whichever comes first (a table ends with the document that reaches either), and the rest last."""

    def __init__(self, file_index: int, rel: str, val_fraction: float) -> None:
        self.file_index = file_index
        self.rel = rel
        self.val_fraction = val_fraction
        self.doc_index: list[int] = []
        self.split: list[np.ndarray] = []
        self.text: list[str] = []
        self.chars: list[int] = []
        self.documents = 0
        self.skipped = 0
        self.next_index = 0

    def add(self, index: int, raw: str | None) -> None:
        """One raw document at its position in the file (take a full chunk out before the next ``add``)."""
        self.next_index = index
        self.extend([raw])

    def extend(self, raws: list[str | None], normalized: bool = False) -> None:
        """Raw documents at the next positions (``normalized``: their newlines and leading byte-order mark are
        handled already, so cleaning only strips them). Take full chunks out with :meth:`chunks`."""
        if normalized and not any(raw.startswith("\ufeff") for raw in raws if raw):
            texts = [raw.strip() if raw else "" for raw in raws]
        else:
            texts = [clean.normalize(raw) if raw else "" for raw in raws]
        first = self.next_index
        self.next_index += len(raws)
        kept = [first + offset for offset, text in enumerate(texts) if text]
        self.skipped += len(raws) - len(kept)
        self.documents += len(kept)
        if len(kept) < len(texts):
            texts = [text for text in texts if text]
        self.doc_index += kept
        self.split.append(validation_mask(f"{self.rel}#", kept, self.val_fraction))
        self.text += texts
        self.chars += map(len, texts)

    def chunks(self) -> Iterator[pa.Table]:
        """The full chunks held (those :meth:`add` one document at a time would have filled)."""
        while len(self.text) >= ROWS_PER_CHUNK or sum(self.chars[:ROWS_PER_CHUNK]) >= CHUNK_CHARS:
            ends = np.cumsum(self.chars[:ROWS_PER_CHUNK])
            yield self.take(min(ROWS_PER_CHUNK, int(np.searchsorted(ends, CHUNK_CHARS)) + 1))

    def take(self, count: int | None = None) -> pa.Table:
        """The first ``count`` rows held (default: all) as a table."""
        count = len(self.text) if count is None else count
        split = np.concatenate(self.split) if self.split else np.zeros(0, bool)
        table = pa.table(
            {
                "file_index": np.full(count, self.file_index, np.int32),
                "doc_index": np.asarray(self.doc_index[:count], np.int64),
                "split": np.where(split[:count], VAL, TRAIN).astype(np.int8),
                "kind": np.full(count, KIND_DOCUMENT, np.int8),
                "text": pa.array(self.text[:count], pa.large_string()),
            },
            schema=DOCUMENT_SCHEMA,
        )
        self.split = [split[count:]]
        del self.doc_index[:count], self.text[:count], self.chars[:count]
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
        try:
            if kind == "jsonl":
                for index, raw in clean.jsonl_line_texts(clean.split_lines(stream.texts()), uri, text_field):
                    chunker.add(index, raw)
                    yield from chunker.chunks()
            else:
                for raws in clean.txt_document_batches(stream.texts(), txt_document):
                    chunker.extend(raws, normalized=True)
                    yield from chunker.chunks()
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
        for batch in parquet.iter_batches(columns=[field], batch_size=ROWS_PER_CHUNK):
            chunker.extend(batch.column(0).to_pylist())
            yield from chunker.chunks()


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
