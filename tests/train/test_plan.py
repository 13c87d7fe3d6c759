"""Pure parts of the Train stage: batch geometry, the generated DeepSpeed config, the resumable data order."""

import numpy as np
import pytest

from pipeline.train.deepspeed import deepspeed_config
from pipeline.train.order import ChunkedReader, SequenceOrder
from pipeline.train.plan import TrainPlan, batch_geometry


def _plan(**changes: object) -> TrainPlan:
    values: dict = dict(
        stage="pretrain",
        model={"n_layer": 2},
        data_dir="d",
        run_dir="r",
        max_steps=100,
        micro_batch_size=4,
        grad_accum=2,
        num_workers=2,
        context_length=64,
        learning_rate=6e-4,
        min_lr_ratio=0.1,
        warmup_steps=10,
        weight_decay=0.1,
        grad_clip=1.0,
        checkpoint_every=10,
        eval_every=10,
        eval_batches=2,
        seed=1,
        use_gpu=False,
        activation_checkpointing=False,
    )
    values.update(changes)
    return TrainPlan(**values)


def test_batch_geometry_from_tokens() -> None:
    assert batch_geometry(None, 8, 2, 128) == (1, None)
    assert batch_geometry(8192, 8, 2, 128) == (4, None)
    accum, note = batch_geometry(3_200_000, 1, 1536, 2048)  # GPT-3 175B: 3.2M tokens is 1562.5 sequences
    assert accum == 1 and note is not None and "3145728" in note


def test_deepspeed_config_is_zero3_gpt3_adamw() -> None:
    plan = _plan()
    config = deepspeed_config(plan)
    assert config["zero_optimization"]["stage"] == 3
    assert config["train_batch_size"] == 4 * 2 * 2 == plan.global_batch
    assert config["gradient_accumulation_steps"] == 2 and config["gradient_clipping"] == 1.0
    adam = config["optimizer"]["params"]
    assert config["optimizer"]["type"] == "AdamW"
    assert adam["betas"] == [0.9, 0.95] and adam["eps"] == 1e-8 and adam["weight_decay"] == 0.1
    assert adam["torch_adam"] is True and config["bf16"]["enabled"] is False  # fp32 on CPU
    schedule = config["scheduler"]["params"]
    assert config["scheduler"]["type"] == "WarmupCosineLR" and schedule["warmup_type"] == "linear"
    assert schedule["cos_min_ratio"] == 0.1 and schedule["total_num_steps"] == 100
    # on gloo no parameter stays whole: none is all-gathered on its own after each step
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    gpu = deepspeed_config(_plan(use_gpu=True))
    assert gpu["bf16"]["enabled"] is True and gpu["optimizer"]["params"]["torch_adam"] is False
    assert "stage3_param_persistence_threshold" not in gpu["zero_optimization"]  # DeepSpeed's default on NCCL


def test_plan_round_trips_through_json() -> None:
    plan = _plan(init_export="x")
    assert TrainPlan.from_json(plan.to_json()) == plan


def test_order_is_deterministic_and_each_epoch_a_permutation() -> None:
    order = SequenceOrder(1000, seed=7, chunk=64)
    first = order.indices(0, 1000)
    assert sorted(first.tolist()) == list(range(1000))
    assert np.array_equal(first, SequenceOrder(1000, seed=7, chunk=64).indices(0, 1000))
    second = order.indices(1000, 1000)
    assert sorted(second.tolist()) == list(range(1000)) and not np.array_equal(first, second)
    assert not np.array_equal(first, SequenceOrder(1000, seed=8, chunk=64).indices(0, 1000))
    across = order.indices(990, 20)  # a window spanning two epochs
    assert np.array_equal(across, np.concatenate([first[990:], second[:10]]))


def test_ranks_and_micro_steps_partition_each_global_batch() -> None:
    world, micro, accum = 2, 3, 2
    starts = [SequenceOrder.micro_batch_start(120, m, r, world, micro) for m in range(accum) for r in range(world)]
    positions = sorted(p for s in starts for p in range(s, s + micro))
    assert positions == list(range(120, 120 + world * micro * accum))


class _Rows:
    def __init__(self, n: int) -> None:
        self.data = np.arange(n * 3).reshape(n, 3)
        self.reads = 0

    def __len__(self) -> int:
        return len(self.data)

    def read(self, start: int, stop: int) -> np.ndarray:
        self.reads += 1
        return self.data[start:stop]


def test_batches_mix_distant_chunks_and_each_chunk_is_read_once_per_window() -> None:
    rows = _Rows(1024)
    order = SequenceOrder(1024, seed=3, chunk=16, window=8)
    reader = ChunkedReader(rows, chunk=16, cache_chunks=order.window + 1)
    first_window = order.indices(0, 16 * 8)
    assert len({int(i) // 16 for i in first_window}) == 8  # a window spans 8 chunks ...
    assert len({int(i) // 16 for i in first_window[:16]}) > 3  # ... and one batch mixes several of them
    got = reader.take(first_window)
    assert [int(r[0]) // 3 for r in got] == first_window.tolist()
    assert rows.reads == 8  # one contiguous read per chunk


def test_empty_split_is_refused() -> None:
    with pytest.raises(ValueError, match="no sequences"):
        SequenceOrder(0, seed=1)


def test_resume_fingerprint_covers_what_changes_the_run() -> None:
    """run.seed picks the data order (and the init): resuming a checkpoint under another seed would silently
    train on another order, so it must be refused like another model or dataset."""
    base = _plan().fingerprint()
    for change in ({"seed": 2}, {"num_workers": 4}, {"context_length": 32}, {"model": {"n_layer": 3}}):
        assert _plan(**change).fingerprint() != base, change
    for harmless in ({"max_steps": 200}, {"eval_every": 5}, {"checkpoint_every": 20}):
        assert _plan(**harmless).fingerprint() == base, harmless
