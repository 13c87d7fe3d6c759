"""Packing a token stream into fixed-length sequences and writing them as parquet shards.

A split's documents (each already ending in ``<|endoftext|>``) are concatenated in order and cut into
non-overlapping rows of ``context_length + 1`` ids: a row's first ``context_length`` ids are the inputs, its last
``context_length`` the shifted targets. No padding. The tail (fewer than ``context_length + 1`` ids left at the
end) is either dropped (``tail="drop"``, counted in ``dropped_tokens``) or completed with ids from the start of the
split's stream (``tail="wrap"``, counted in ``wrapped_tokens``), so that for every split:

    tokens == sequences * (context_length + 1) + dropped_tokens - wrapped_tokens
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

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

    def finish(self, tail: str) -> np.ndarray:
        """Handle the tail; returns the last row when wrapped, else zero rows."""
        rest, self._pending = self._pending, np.empty(0, self.dtype)
        if len(rest) == 0:
            return np.empty((0, self.row_length), self.dtype)
        if tail == "wrap" and self.tokens >= self.row_length:
            need = self.row_length - len(rest)
            self.wrapped_tokens += need
            self.sequences += 1
            return np.concatenate([rest, self._head[:need]]).reshape(1, self.row_length)
        self.dropped_tokens += len(rest)
        return np.empty((0, self.row_length), self.dtype)


@dataclass
class ShardWriter:
    """Writes rows into ``<root>/<split>/shard-NNNNN.parquet`` files of at most ``shard_rows`` rows each.

    Column ``tokens`` is a ``fixed_size_list<uint16|int32>[row_length]``; row groups of ``ROW_GROUP_SEQUENCES``.
    """

    root: Path
    split: str
    row_length: int
    dtype: np.dtype
    shard_rows: int
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
        relative = f"{self.split}/shard-{len(self.shards):05d}.parquet"
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(sequences_table(rows, self.dtype), path, row_group_size=ROW_GROUP_SEQUENCES)
        self.shards.append({"path": relative, "rows": len(rows), "sha256": storage.file_sha256(path)})


def sequences_table(rows: np.ndarray, dtype: np.dtype) -> pa.Table:
    values = pa.array(np.ascontiguousarray(rows, dtype=dtype).reshape(-1), pa.from_numpy_dtype(dtype))
    return pa.table({"tokens": pa.FixedSizeListArray.from_arrays(values, rows.shape[1])})
