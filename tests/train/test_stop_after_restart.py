"""``train.stop_after_steps`` ends an invocation at the step fixed when it started, even when Ray Train restarts the
worker group from a later checkpoint mid-way (``train.max_failures``): one Ray Train worker of a 2-rank run is
SIGKILLed (by pid, from the test) once Ray Train has registered a checkpoint and a later step ran."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from helpers.ray_state import PretrainThread, wait_until
from helpers.settings import nano_pretrain

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS, STOP_AFTER, CHECKPOINT_EVERY = 16, 8, 2

pytestmark = pytest.mark.slow


def _registered_step(experiment: Path) -> int:
    """The step of the newest checkpoint Ray Train's controller has registered (what a restarted group resumes
    from), from its checkpoint-manager snapshot; 0 before the first."""
    try:
        latest = json.loads((experiment / "checkpoint_manager_snapshot.json").read_text()).get(
            "latest_checkpoint_result"
        )
    except (OSError, json.JSONDecodeError):  # not written yet, or being rewritten
        return 0
    return int(latest["metrics"]["step"]) if latest else 0


def _steps(path: Path) -> list[int]:
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line)["step"])
        except json.JSONDecodeError:  # a torn last line while rank 0 appends
            pass
    return rows


def test_restart_after_a_worker_failure_keeps_the_invocation_stop_step(tmp_path: Path, ray_session: None) -> None:
    from pipeline.config import load_config
    from pipeline.data.build import tokenize_corpus
    from pipeline.layout import RunLayout

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(REPO / "data" / "sample" / "shakespeare" / "macbeth_gut.txt", corpus)
    run = tmp_path / "run"
    config = load_config(
        overrides=nano_pretrain(
            run,
            corpus,
            "data.num_tokenizers=1",
            f"train.max_steps={MAX_STEPS}",
            f"train.stop_after_steps={STOP_AFTER}",
            f"train.checkpoint_every={CHECKPOINT_EVERY}",
            f"train.eval_every={MAX_STEPS}",
            "train.eval_batches=1",
            "train.max_failures=1",
        )
    )
    tokenize_corpus(config, log=lambda _: None)
    training = PretrainThread(config)
    thread, outcome, workers = training.thread, training.outcome, training.workers
    live = run / "pretrain" / "metrics.jsonl"
    experiment = Path(RunLayout.of(config).experiment("pretrain"))

    def registered_and_past() -> bool:
        registered, steps = _registered_step(experiment), _steps(live)
        return (0 < registered < STOP_AFTER and bool(steps) and steps[-1] > registered) or not thread.is_alive()

    wait_until(registered_and_past, 180, "a registered checkpoint and a step past it", poll=0.02)
    assert thread.is_alive(), f"the invocation ended before the kill: {outcome}"
    registered = _registered_step(experiment)
    os.kill(int(workers[-1]["Pid"]), signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive(), "the run did not finish after a worker was killed"
    assert "error" not in outcome, f"the run did not recover: {outcome.get('error')!r}"
    restarted = training.started_since()
    assert len(restarted) == 4, f"expected the first group and a restarted one, got {len(restarted)} workers"

    summary = outcome["summary"]
    assert (summary["status"], summary["steps"]) == ("paused", STOP_AFTER), (registered, summary)
    assert _steps(live) == list(range(1, STOP_AFTER + 1))
