"""Packing a token stream into fixed-length sequences and writing them as parquet shards.

A split's documents (each already ending in ``<|endoftext|>``) are concatenated in order and cut into
non-overlapping rows of ``context_length + 1`` ids: a row's first ``context_length`` ids are the inputs, its last
``context_length`` the shifted targets. No padding. The tail (fewer than ``context_length + 1`` ids left at the
end) is either dropped (``tail="drop"``, counted in ``dropped_tokens``) or completed with ids from the start of the
split's stream (``tail="wrap"``, counted in ``wrapped_tokens``), so that for every split:

    tokens == sequences * (context_length + 1) + dropped_tokens - wrapped_tokens
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.documents import KIND_DOCUMENT, KIND_FILE_SUMMARY
from pipeline.data.tokenize import TokenizeDocuments, token_dtype

ROW_GROUP_SEQUENCES = 1024


class Packer:
    """Streams token arrays in, full ``(n, row_length)`` blocks out; remembers the head of the stream for wrap."""

    def __init__(self, row_length: int, dtype: np.dtype) -> None:
        self.row_length = row_length
        self.dtype = dtype
        self._pending = np.empty(0, dtype)
        self._head = np.empty(0, dtype)
        self.tokens = 0
        self.sequences = 0
        self.dropped_tokens = 0
        self.wrapped_tokens = 0

    @property
    def head(self) -> np.ndarray:
        """The stream's first ``row_length`` ids (fewer while it is shorter)."""
        return self._head

    @property
    def pending(self) -> np.ndarray:
        """The ids fed since the last complete row."""
        return self._pending

    def feed(self, tokens: np.ndarray) -> np.ndarray:
        """Add ids; returns the complete rows now available (possibly zero rows)."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        self.tokens += len(tokens)
        if len(self._head) < self.row_length:
            self._head = np.concatenate([self._head, tokens[: self.row_length - len(self._head)]])
        stream = np.concatenate([self._pending, tokens]) if len(self._pending) else tokens
        full = len(stream) // self.row_length * self.row_length
        self._pending = stream[full:].copy()
        self.sequences += full // self.row_length
        return stream[:full].reshape(-1, self.row_length)

    def finish(self, tail: str, head: np.ndarray | None = None, stream_tokens: int | None = None) -> np.ndarray:
        """Handle the tail; returns the last row when wrapped, else zero rows. A wrap takes its ids from ``head``
        (default: this stream's) and needs ``stream_tokens`` (default: the ids fed) to fill a row."""
        rest, self._pending = self._pending, np.empty(0, self.dtype)
        head = self._head if head is None else head
        if len(rest) == 0:
            return np.empty((0, self.row_length), self.dtype)
        if tail == "wrap" and (self.tokens if stream_tokens is None else stream_tokens) >= self.row_length:
            need = self.row_length - len(rest)
            self.wrapped_tokens += need
            self.sequences += 1
            return np.concatenate([rest, head[:need]]).reshape(1, self.row_length)
        self.dropped_tokens += len(rest)
        return np.empty((0, self.row_length), self.dtype)


class TailPacker:
    """The rows of a split made from what its blocks could not fill.

    Blocks are packed where they are tokenized, each on its own; a block's tail (fewer than ``row_length`` ids
    after its last full row) comes here, block after block, and is packed like one stream. The last partial row
    is dropped or wrapped with the first ids of the whole split, as :class:`Packer` does for one stream. Because
    every block's tail is shorter than a row, the split has ``tokens // row_length`` rows either way, the same as
    packing its whole stream at once.
    """

    def __init__(self, row_length: int, dtype: np.dtype) -> None:
        self._packer = Packer(row_length, dtype)
        self.row_length = row_length
        self.head = np.empty(0, dtype)
        self.tokens = 0
        self.sequences = 0

    def add(self, tokens: int, rows: int, head: np.ndarray, tail: np.ndarray) -> np.ndarray:
        """One block's count of ids and full rows, its first ids and its tail; returns the rows its tail
        completes."""
        self.tokens += tokens
        self.sequences += rows
        if len(self.head) < self.row_length:
            self.head = np.concatenate([self.head, head[: self.row_length - len(self.head)]])
        return self._packer.feed(tail)

    def finish(self, tail: str) -> np.ndarray:
        """The last row when wrapped (with the split's first ids, not those of the tails), else zero rows."""
        return self._packer.finish(tail, self.head, self.tokens)

    @property
    def stats(self) -> dict[str, int]:
        return {
            "tokens": self.tokens,
            "sequences": self.sequences + self._packer.sequences,
            "dropped_tokens": self._packer.dropped_tokens,
            "wrapped_tokens": self._packer.wrapped_tokens,
        }


@dataclass
class ShardWriter:
    """Writes rows into ``<root>/<split>/<prefix>-NNNNN.parquet`` files of at most ``shard_rows`` rows each.

    ``root`` is a local directory or a URI. Column ``tokens`` is a ``fixed_size_list<uint16|int32>[row_length]``;
    row groups of ``ROW_GROUP_SEQUENCES``. Each file is written whole, its sha256 taken from the bytes written.
    """

    root: str
    split: str
    row_length: int
    dtype: np.dtype
    shard_rows: int
    prefix: str = "shard"
    shards: list[dict[str, Any]] = field(default_factory=list)
    _buffer: list[np.ndarray] = field(default_factory=list)
    _buffered: int = 0

    def write(self, rows: np.ndarray) -> None:
        while len(rows):
            take = min(len(rows), self.shard_rows - self._buffered)
            self._buffer.append(rows[:take])
            self._buffered += take
            rows = rows[take:]
            if self._buffered == self.shard_rows:
                self._flush()

    def close(self) -> list[dict[str, Any]]:
        if self._buffered:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        rows = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        self._buffer, self._buffered = [], 0
        relative = f"{self.split}/{self.prefix}-{len(self.shards):05d}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(sequences_table(rows, self.dtype), sink, row_group_size=ROW_GROUP_SEQUENCES)
        data = sink.getvalue().to_pybytes()
        storage.write_bytes(storage.join(self.root, relative), data)
        self.shards.append({"path": relative, "rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()})


def sequences_table(rows: np.ndarray, dtype: np.dtype) -> pa.Table:
    values = pa.array(np.ascontiguousarray(rows, dtype=dtype).reshape(-1), pa.from_numpy_dtype(dtype))
    return pa.table({"tokens": pa.FixedSizeListArray.from_arrays(values, rows.shape[1])})


class TokenizeAndPack(TokenizeDocuments):
    """Ray Data actor: document rows to packed shards, written where the block is tokenized, so token rows never
    travel to the driver.

    Each (source, split) stream of a block is packed on its own (:class:`Packer`) and its full rows written under
    ``root`` (``<dir>/shard-<file>-<doc>-NNNNN.parquet``, named after the block's first document, so names are
    unique and the same in every run). Out goes one small row per stream: ``source``, ``split``, ``documents``,
    ``tokens``, ``rows``, ``shards`` (JSON: path, rows, sha256), ``head`` (its first ``row_length`` ids, for a
    wrapped tail) and ``tail`` (the ids after its last full row, for :class:`TailPacker`); and each file's summary
    row as it came (``info``).
    """

    def __init__(
        self,
        tokenizer_name: str,
        tokenizer_file: str | None,
        root: str,
        row_length: int,
        shard_rows: int,
        source_of: list[int],
        stream_dirs: list[list[str]],
    ) -> None:
        super().__init__(tokenizer_name, tokenizer_file)
        self.dtype = token_dtype(self.tokenizer.n_vocab)
        self.root = root
        self.row_length = row_length
        self.shard_rows = shard_rows
        self.source_of = np.asarray(source_of, np.int64)
        self.stream_dirs = stream_dirs

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.pack(super().__call__(batch))

    def pack(self, batch: pa.Table) -> pa.Table:
        kind = batch.column("kind").to_numpy()
        split = batch.column("split").to_numpy()
        file_index = batch.column("file_index").to_numpy()
        doc_index = batch.column("doc_index").to_numpy()
        source = self.source_of[file_index]
        tokens = batch.column("tokens")
        if isinstance(tokens, pa.ChunkedArray):
            tokens = tokens.combine_chunks()
        offsets = tokens.offsets.to_numpy()
        values = tokens.values.to_numpy(zero_copy_only=False)
        out: dict[str, list[Any]] = {name: [] for name in PACKED_COLUMNS}

        def emit(**row: Any) -> None:
            for name in PACKED_COLUMNS:
                out[name].append(row.get(name))

        is_doc = kind == KIND_DOCUMENT
        for s, dirs in enumerate(self.stream_dirs):
            for index, directory in enumerate(dirs):
                rows = np.flatnonzero(is_doc & (split == index) & (source == s))
                if len(rows) == 0:
                    continue
                # rows of one split are mostly contiguous runs; gather their ids in order
                starts, stops = offsets[rows], offsets[rows + 1]
                if len(rows) == rows[-1] - rows[0] + 1:
                    ids = values[starts[0] : stops[-1]]
                else:
                    ids = np.concatenate([values[a:b] for a, b in zip(starts, stops, strict=True)])
                packer = Packer(self.row_length, self.dtype)
                first = int(rows[0])
                writer = ShardWriter(
                    self.root,
                    directory,
                    self.row_length,
                    self.dtype,
                    self.shard_rows,
                    prefix=f"shard-{file_index[first]:05d}-{doc_index[first]:08d}",
                )
                writer.write(packer.feed(ids))
                emit(
                    file_index=int(file_index[first]),
                    doc_index=int(doc_index[first]),
                    kind=KIND_DOCUMENT,
                    source=s,
                    split=index,
                    documents=len(rows),
                    tokens=len(ids),
                    rows=packer.sequences,
                    shards=json.dumps(writer.close()),
                    head=packer.head,
                    tail=packer.pending,
                )
        info = batch.column("info")
        for row in np.flatnonzero(kind == KIND_FILE_SUMMARY):
            emit(
                file_index=int(file_index[row]),
                doc_index=int(doc_index[row]),
                kind=KIND_FILE_SUMMARY,
                info=info[int(row)].as_py(),
            )
        ids_type = pa.large_list(pa.from_numpy_dtype(self.dtype))
        return pa.table({name: pa.array(out[name], type_ or ids_type) for name, type_ in PACKED_COLUMNS.items()})


# the columns of TokenizeAndPack's rows (None: a list of ids, of the dataset's id type)
PACKED_COLUMNS: dict[str, pa.DataType | None] = {
    "file_index": pa.int32(),
    "doc_index": pa.int64(),
    "kind": pa.int8(),
    "source": pa.int32(),
    "split": pa.int8(),
    "documents": pa.int64(),
    "tokens": pa.int64(),
    "rows": pa.int64(),
    "shards": pa.large_string(),
    "head": None,
    "tail": None,
    "info": pa.large_string(),
}
