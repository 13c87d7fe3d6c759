"""One rank's training and evaluation batches, in the resumable order of :mod:`pipeline.train.order`.

Pretraining rows are packed sequences (inputs ``tokens[:-1]``, targets ``tokens[1:]``, every target counts);
fine-tuning rows are prompt/completion examples, right-padded, with ``IGNORE`` targets outside the loss mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipeline.train.order import BlendedOrder, ChunkedReader, SequenceOrder
from pipeline.train.plan import TrainPlan

IGNORE = -100  # cross_entropy's ignore_index: targets that carry no loss


def training_order(manifest: Any, num_sequences: int, seed: int) -> SequenceOrder | BlendedOrder:
    """The train split's order: one source's :class:`SequenceOrder`, or the weighted blend of the manifest's
    sources (their sequences lie one source after the other in the split, in manifest order)."""
    sources = manifest.data.get("sources") or {}
    if len(sources) < 2:
        return SequenceOrder(num_sequences, seed)
    sizes = [int(info["splits"]["train"]["sequences"]) for info in sources.values()]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    return BlendedOrder(sizes, [float(info["weight"]) for info in sources.values()], seed, offsets)


def source_usage(manifest: Any, consumed: int, seed: int) -> dict[str, dict[str, float]]:
    """What the first ``consumed`` positions of the train order took from each source: ``tokens_by_source``
    (target tokens) and ``epochs_by_source`` (passes over the source's train sequences)."""
    sources = manifest.data.get("sources") or {"corpus": {"splits": {"train": manifest.data["splits"]["train"]}}}
    sizes = [int(info["splits"]["train"]["sequences"]) for info in sources.values()]
    order = training_order(manifest, sum(sizes), seed)
    counts = order.positions_by_source(consumed) if isinstance(order, BlendedOrder) else np.array([consumed])
    targets = manifest.sequence_length - 1
    rows = list(zip(sources, counts, sizes, strict=True))
    return {
        "tokens_by_source": {name: int(n) * targets for name, n, _ in rows},
        "epochs_by_source": {name: round(int(n) / size, 4) for name, n, size in rows},
    }


class Batches:
    """One rank's micro-batches from a dataset's train split, in the resumable order, and its share of the
    evaluation split. Subclasses open the stores and turn rows into (inputs, targets)."""

    train_split, eval_split = "train", "val"

    def __init__(self, plan: TrainPlan, rank: int, world: int) -> None:
        from pipeline.data.reader import load_manifest

        manifest = load_manifest(plan.data_dir)
        self.plan, self.rank, self.world = plan, rank, world
        self.train = self.open(manifest, self.train_split)
        self.val = self.open(manifest, self.eval_split)
        self.order = training_order(manifest, len(self.train), plan.seed)
        self.reader = ChunkedReader(self.train, self.order.chunk, cache_chunks=self.order.window + 1)

    def open(self, manifest: Any, split: str) -> Any:
        raise NotImplementedError

    def _tensors(self, rows: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def micro_batch(self, consumed: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        mb = self.plan.micro_batch_size
        start = SequenceOrder.micro_batch_start(consumed, micro_step, self.rank, self.world, mb)
        return self._tensors(self.reader.take(self.order.indices(start, mb)))

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        mb = self.plan.micro_batch_size
        total = min(len(self.val), self.plan.eval_batches * mb * self.world)
        for start in range(self.rank * mb, total, self.world * mb):
            yield self._tensors(list(self.val.read(start, min(start + mb, total))))


class PretrainBatches(Batches):
    """Packed sequences: inputs are tokens[:-1], targets tokens[1:], every target counts."""

    def open(self, manifest: Any, split: str) -> Any:
        from pipeline.data.reader import SequenceStore

        return SequenceStore(manifest, split)

    def _tensors(self, rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        return batch[:, :-1], batch[:, 1:]


class FinetuneBatches(Batches):
    """Variable-length prompt/completion examples, right-padded; loss only where the mask says so."""

    eval_split = "heldout"

    def __init__(self, plan: TrainPlan, rank: int, world: int) -> None:
        super().__init__(plan, rank, world)
        self.pad_id = int(plan.tokenizer.get("eot_id", 50256))

    def open(self, manifest: Any, split: str) -> Any:
        from pipeline.data.reader import FinetuneStore

        return FinetuneStore(manifest, split)

    def _tensors(self, examples: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids, _ in examples) - 1
        inputs = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for row, (ids, mask) in enumerate(examples):
            ids_t = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            keep = torch.from_numpy(np.asarray(mask, dtype=bool))[1:]
            n = len(ids_t) - 1
            inputs[row, :n] = ids_t[:-1]
            targets[row, :n] = torch.where(keep, ids_t[1:], torch.full_like(ids_t[1:], IGNORE))
        return inputs, targets


def batches_for(plan: TrainPlan, rank: int, world: int) -> Batches:
    return PretrainBatches(plan, rank, world) if plan.stage == "pretrain" else FinetuneBatches(plan, rank, world)
