"""Training checkpoints: what one holds, how a rank saves and restores it, and how the driver finds the newest.

A checkpoint is one Ray Train checkpoint directory (``<run.dir>/<run.name>-<stage>/checkpoint_*``) holding every
rank's DeepSpeed ZeRO-3 shards (``<tag>/zero_pp_rank_*``; rank names never collide, so Ray's merge of the ranks'
folders is safe) plus, from rank 0, ``trainer_state.json`` (step, data position, DeepSpeed tag and the plan's
fingerprint) and ``metrics.jsonl`` (every step's metrics up to that step). A checkpoint resumes only a run whose
plan has the same fingerprint (same model, data, world size).

Beside the checkpoints, each stage keeps ``<run.dir>/<stage>/state.json``: its status (running, paused, complete),
the plan it ran and, once complete, its summary; a complete stage with the same plan and its export is skipped.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.layout import RunLayout, Stage
from pipeline.train.metrics import MetricsLog
from pipeline.train.plan import TrainError, TrainPlan

STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"


# ---------------------------------------------------------------------------------------------- on a rank


def restore(engine: Any, plan: TrainPlan, log: MetricsLog) -> tuple[int, int, int]:
    """Load Ray Train's checkpoint, if it handed this rank one; returns ``(step, consumed, tokens_seen)``."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0, 0
    with checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / STATE_FILE).read_text())
        if state["fingerprint"] != plan.fingerprint():
            raise RuntimeError(
                f"the checkpoint in {directory} was made for {state['fingerprint']}, not {plan.fingerprint()}"
            )
        engine.load_checkpoint(directory, tag=state["tag"])
        log.restore((Path(directory) / METRICS_FILE).read_text().splitlines(), upto_step=state["step"])
        return state["step"], state["consumed"], state["tokens_seen"]


def save(
    engine: Any, plan: TrainPlan, rank: int, position: dict[str, int], log: MetricsLog, report: dict[str, Any]
) -> None:
    """Every rank saves its shards (DeepSpeed needs all of them); rank 0 adds the state and metrics; then
    ``ray.train.report`` (a barrier) hands the folder to Ray Train. ``position``: step, consumed, tokens_seen."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix=f"raygpt-ckpt-{rank}-") as directory:
        tag = f"step{position['step']}"
        engine.save_checkpoint(directory, tag=tag)
        if rank == 0:
            state = {**position, "tag": tag, "fingerprint": plan.fingerprint()}
            (Path(directory) / STATE_FILE).write_text(json.dumps(state))
            (Path(directory) / METRICS_FILE).write_text(log.text())
        ray.train.report(report, checkpoint=Checkpoint.from_directory(directory))


# ---------------------------------------------------------------------------------------------- on the driver


def read_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    return json.loads(storage.read_bytes(storage.join(checkpoint_dir, STATE_FILE)))


def read_metrics(checkpoint_dir: str | Path) -> list[dict[str, Any]]:
    text = storage.read_bytes(storage.join(checkpoint_dir, METRICS_FILE)).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def latest_checkpoint(layout: RunLayout, stage: Stage) -> tuple[str, int] | None:
    """The newest checkpoint of ``stage`` in this run (any that holds a trainer state), with its step."""
    import pyarrow.fs as pafs

    experiment = layout.experiment(stage)
    if not storage.exists(experiment):
        return None
    fs, root = storage.filesystem(experiment)
    best: tuple[str, int] | None = None
    for entry in fs.get_file_info(pafs.FileSelector(root)):
        if entry.type != pafs.FileType.Directory:
            continue
        state_file = f"{entry.path}/{STATE_FILE}"
        if fs.get_file_info(state_file).type != pafs.FileType.File:
            continue
        with fs.open_input_stream(state_file) as handle:
            step = int(json.loads(handle.read())["step"])
        location = storage.join(experiment, entry.base_name)
        if best is None or step > best[1]:
            best = (location, step)
    return best


def registered(layout: RunLayout, stage: Stage) -> Any | None:
    """Ray Train's own record of the stage's experiment: a ``ray.train.Result`` whose checkpoint is the newest its
    controller registered (the one a new fit resumes from) and whose metrics are that checkpoint's report; None
    before the first registered checkpoint."""
    from ray.train import Result

    experiment = layout.experiment(stage)
    if not storage.exists(experiment):
        return None
    try:
        result = Result.from_path(experiment)
    except RuntimeError:  # a folder without Ray Train's snapshot: nothing was registered
        return None
    return result if result.checkpoint is not None else None


def check_resumable(layout: RunLayout, plan: TrainPlan, fresh: bool) -> None:
    """Resuming needs checkpoints of the same model, data and world size; otherwise refuse (or start over with
    ``fresh``). An experiment folder without any checkpoint holds nothing worth keeping."""
    experiment = layout.experiment(plan.stage)
    found = None if fresh else latest_checkpoint(layout, plan.stage)
    if found is None:
        storage.remove_tree(experiment)
        return
    previous = read_state(found[0]).get("fingerprint")
    if previous != plan.fingerprint():
        changed = sorted(k for k in plan.fingerprint() if (previous or {}).get(k) != plan.fingerprint()[k])
        raise TrainError(
            f"{experiment} holds checkpoints of another {plan.stage} setup (different {', '.join(changed)}); "
            "use another run.dir or pass --fresh to start over"
        )


def read_stage_state(layout: RunLayout, stage: Stage) -> dict[str, Any] | None:
    path = layout.state_file(stage)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_bytes(path))


def write_stage_state(layout: RunLayout, stage: Stage, state: dict[str, Any]) -> None:
    storage.write_bytes(layout.state_file(stage), json.dumps(state, indent=2).encode())
