"""A diverged run, for real (Ray Train + DeepSpeed ZeRO-3, 2 CPU workers, nano model): the divergence is a learning
rate too large for fp32 (a genuine setting, no test hook), taken up by a run resumed from a sane checkpoint. The
run must stop at once (no Ray Train retries), checkpoint nothing, keep the last good checkpoint (even with
``num_to_keep=1``), refuse to repeat itself, and resume from that checkpoint once the setting is fixed."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
from helpers.ray_state import live_actors
from helpers.settings import nano_pretrain

from pipeline.config import PipelineConfig, load_config
from pipeline.layout import RunLayout

REPO = Path(__file__).resolve().parents[2]
DIVERGING_LR = "1.0e+30"  # the first update makes weights so large that the next forward pass overflows fp32


def _config(run_dir: Path, corpus: Path, *extra: str) -> PipelineConfig:
    return load_config(
        overrides=nano_pretrain(
            run_dir,
            corpus,
            "data.num_tokenizers=1",
            "train.max_steps=6",
            "train.checkpoint_every=2",
            "train.eval_every=6",
            "train.eval_batches=1",
            "train.max_failures=2",  # a divergence must not be retried
            "train.num_to_keep=1",  # the last good checkpoint must survive even so
            *extra,
        )
    )


def _workers() -> set[str]:
    return {a["ActorID"] for a in live_actors("RayTrainWorker", state=None)}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "raygpt-pretrain").glob("checkpoint_*"))


def test_diverged_run_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path: Path, ray_session: None) -> None:
    from pipeline.data.build import tokenize_corpus
    from pipeline.train import checkpoint
    from pipeline.train.driver import TrainError, pretrain

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(REPO / "data" / "sample" / "shakespeare" / "macbeth_gut.txt", corpus)
    run = tmp_path / "run"
    tokenize_corpus(_config(run, corpus), log=lambda _: None)
    layout = RunLayout.of(_config(run, corpus))

    paused = pretrain(_config(run, corpus, "train.stop_after_steps=2"))
    assert (paused["status"], paused["steps"]) == ("paused", 2)
    good = checkpoint.latest_checkpoint(layout, "pretrain")
    assert good is not None and good[1] == 2
    kept = _checkpoints(run)
    good_rows = _rows(run)

    workers = _workers()
    with pytest.raises(TrainError, match=r"pretrain diverged at step \d+: .* (nan|inf)") as diverged:
        pretrain(_config(run, corpus, f"train.learning_rate={DIVERGING_LR}"))
    assert len(_workers() - workers) == 2, "a divergence is deterministic: Ray Train must not retry it"
    assert "step 2" in str(diverged.value), "the message names the checkpoint kept"
    assert checkpoint.latest_checkpoint(layout, "pretrain") == good
    assert _checkpoints(run) == kept
    assert checkpoint.read_stage_state(layout, "pretrain")["status"] == "diverged"

    workers, started = _workers(), time.monotonic()
    with pytest.raises(TrainError, match=r"diverged at step \d+ .*with these settings"):
        pretrain(_config(run, corpus, f"train.learning_rate={DIVERGING_LR}"))
    assert _workers() == workers and time.monotonic() - started < 30, "the same settings are refused up front"

    resumed = pretrain(_config(run, corpus))
    assert resumed["steps"] == 6
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[:2] == good_rows, "the resumed run starts from the kept checkpoint"
