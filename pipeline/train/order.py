"""The order in which training consumes sequences: deterministic, resumable, and friendly to sharded storage.

Epoch ``e`` visits the ``n`` sequences of a split as a seeded permutation of chunks of consecutive sequences; the
permuted chunks are taken ``window`` at a time and the sequences of each window shuffled together. Every read is
a contiguous range of the shards (one chunk), only a window of chunks is ever held in memory, and a batch still
mixes ``window`` distant parts of the corpus (one chunk per batch would train on near-duplicate neighbours).
Position ``p`` of the infinite stream (epoch after epoch) maps to one sequence index; a checkpoint stores how
many positions were consumed, and resuming continues with the next unseen one. Rank ``r`` of ``w`` takes every
``w``-th micro-batch of the global batch, so the same positions are trained whatever the number of resumes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

import numpy as np


class RowSource(Protocol):
    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...


class SequenceOrder:
    def __init__(self, num_sequences: int, seed: int, chunk: int = 64, window: int = 64) -> None:
        if num_sequences <= 0:
            raise ValueError("the training split holds no sequences")
        self.n = num_sequences
        self.seed = seed
        self.chunk = max(1, min(chunk, num_sequences))
        self.window = max(1, window)
        self._epochs: OrderedDict[int, np.ndarray] = OrderedDict()

    def _epoch(self, epoch: int) -> np.ndarray:
        order = self._epochs.get(epoch)
        if order is None:
            rng = np.random.default_rng([self.seed, epoch])
            starts = rng.permutation(np.arange(0, self.n, self.chunk))
            pieces = []
            for first in range(0, len(starts), self.window):
                members = [np.arange(s, min(s + self.chunk, self.n)) for s in starts[first : first + self.window]]
                pieces.append(rng.permutation(np.concatenate(members)))
            order = np.concatenate(pieces)
            self._epochs[epoch] = order
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return order

    def indices(self, start: int, count: int) -> np.ndarray:
        """Sequence indices at stream positions ``[start, start + count)``."""
        positions = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(positions // self.n):
            mask = positions // self.n == epoch
            out[mask] = self._epoch(int(epoch))[positions[mask] % self.n]
        return out

    @staticmethod
    def micro_batch_start(consumed: int, micro_step: int, rank: int, world: int, micro_batch_size: int) -> int:
        """Stream position of rank ``rank``'s ``micro_step``-th micro-batch of the step starting at ``consumed``."""
        return consumed + (micro_step * world + rank) * micro_batch_size


class ChunkedReader:
    """Random access by index over a source that reads contiguous ranges, caching the chunks in use."""

    def __init__(self, source: RowSource, chunk: int, cache_chunks: int = 65) -> None:
        self.source = source
        self.chunk = max(1, chunk)
        self.cache_chunks = cache_chunks
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def _chunk(self, index: int) -> np.ndarray:
        rows = self._cache.get(index)
        if rows is None:
            start = index * self.chunk
            rows = self.source.read(start, min(start + self.chunk, len(self.source)))
            self._cache[index] = rows
            while len(self._cache) > self.cache_chunks:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(index)
        return rows

    def take(self, indices: np.ndarray) -> list:
        """The rows at ``indices``, in that order."""
        return [self._chunk(int(i) // self.chunk)[int(i) % self.chunk] for i in indices]
