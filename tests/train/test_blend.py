"""Pretraining on two weighted sources for real (Ray Train + DeepSpeed ZeRO-3, 2 CPU workers, nano model): the
summary and state.json report what each source gave, in the configured shares, and a run stopped and resumed
trains exactly the steps of an uninterrupted one (same sequences, same losses)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.corpora import two_sources

from pipeline.config import load_config

STEPS = 6


def _settings(tmp_path: Path, run: str, *extra: str) -> list[str]:
    return two_sources(
        tmp_path,
        0.7,
        0.3,
        f"run.dir={tmp_path / run}",
        "model.preset=nano",
        f"train.max_steps={STEPS}",
        "train.checkpoint_every=2",
        f"train.eval_every={STEPS}",
        "train.eval_batches=1",
        "train.micro_batch_size=4",
        "train.warmup_steps=1",
        "train.max_failures=0",
        *extra,
    )


def _losses(run_dir: Path) -> list[tuple[int, int, float]]:
    rows = [json.loads(line) for line in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["tokens"], row["loss"]) for row in rows]


def test_two_sources_train_by_weight_and_resume_exactly(tmp_path: Path, ray_session: None) -> None:
    from pipeline.data.build import tokenize_corpus
    from pipeline.train.driver import pretrain

    straight = load_config(None, _settings(tmp_path, "straight"))
    tokenize_corpus(straight, log=lambda _: None)
    summary = pretrain(straight)
    tokens = summary["tokens_by_source"]
    assert sum(tokens.values()) == summary["tokens"]
    assert tokens["web"] / summary["tokens"] == pytest.approx(0.3, abs=0.01)
    assert summary["epochs_by_source"]["web"] > 1 > summary["epochs_by_source"]["books"]
    state = json.loads((tmp_path / "straight" / "pretrain" / "state.json").read_text())
    assert state["summary"]["tokens_by_source"] == tokens

    resumed = load_config(None, _settings(tmp_path, "resumed", "train.stop_after_steps=2"))
    tokenize_corpus(resumed, log=lambda _: None)
    assert pretrain(resumed)["status"] == "paused"
    again = pretrain(load_config(None, _settings(tmp_path, "resumed")))  # resumes from step 2 to the end
    assert again["tokens_by_source"] == tokens
    straight_rows, resumed_rows = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert [r[:2] for r in resumed_rows] == [r[:2] for r in straight_rows]
    for (step, _, a), (_, _, b) in zip(straight_rows, resumed_rows, strict=True):
        assert a == pytest.approx(b, abs=1e-5), step
