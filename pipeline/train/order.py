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


class BlendedOrder:
    """Sources mixed by weight, GPT-3 style (not in proportion to their sizes): position ``p`` of the stream goes
    to one source by a fixed pattern, and the ``k``-th position of a source to its own :class:`SequenceOrder`,
    epoch after epoch, so a small source with a large weight is repeated (upsampled) and a large one with a small
    weight is not exhausted.

    The pattern repeats every ``period`` positions: each source gets its largest-remainder share of the period's
    slots, interleaved so that after any prefix every source is within one position of its exact share (the
    largest-deficit rule of Megatron's BlendableDataset). A position maps to its source and rank within the source
    in O(1), so resuming at any position is exact and nothing is precomputed per step.
    ``offsets[s]`` is where source ``s``'s sequences start in the store that holds them all (manifest order).
    """

    def __init__(
        self, sizes: list[int], weights: list[float], seed: int, offsets: list[int], period: int = 1000
    ) -> None:
        if any(size <= 0 for size in sizes):
            raise ValueError("every source needs at least one training sequence")
        shares = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        slots = np.floor(shares * period).astype(np.int64)
        for s in np.argsort(-(shares * period - slots), kind="stable")[: period - int(slots.sum())]:
            slots[s] += 1
        pattern = np.empty(period, dtype=np.int64)
        taken = np.zeros(len(sizes), dtype=np.int64)
        for i in range(period):
            s = int(np.argmax(slots * (i + 1) / period - taken))  # the source furthest behind its share
            pattern[i] = s
            taken[s] += 1
        self.period, self.slots, self.pattern = period, slots, pattern
        # rank[i]: how many earlier positions of the period went to pattern[i]'s source
        self.rank = np.empty(period, dtype=np.int64)
        seen = np.zeros(len(sizes), dtype=np.int64)
        for i, s in enumerate(pattern):
            self.rank[i] = seen[s]
            seen[s] += 1
        self.orders = [SequenceOrder(size, seed + s) for s, size in enumerate(sizes)]
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.shares = shares
        self.chunk = min(order.chunk for order in self.orders)
        self.window = sum(order.window for order in self.orders)

    def positions_by_source(self, count: int) -> np.ndarray:
        """How many of the first ``count`` positions each source got."""
        blocks, rest = divmod(count, self.period)
        return blocks * self.slots + np.bincount(self.pattern[:rest], minlength=len(self.orders))

    def indices(self, start: int, count: int) -> np.ndarray:
        positions = np.arange(start, start + count)
        blocks, within = np.divmod(positions, self.period)
        source = self.pattern[within]
        local = blocks * self.slots[source] + self.rank[within]  # position within the source's own stream
        out = np.empty(count, dtype=np.int64)
        for s in np.unique(source):
            mask = source == s  # a source's positions in a range of the stream are consecutive in its own stream
            out[mask] = self.offsets[s] + self.orders[int(s)].indices(int(local[mask][0]), int(mask.sum()))
        return out


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
