"""The whole pipeline with ``run.dir`` and every input on ``s3://`` (a real S3-protocol server on loopback, the
``s3`` fixture): tokenize -> pretrain -> finetune -> export -> serve, a second run that skips every stage, a data
change that starts training over without manual cleanup, and a publish killed half-way that leaves the previous
export readable and served."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
import requests
from helpers import REPO
from helpers.settings import tiny_run

from pipeline import storage
from pipeline.config import PipelineConfig, load_config
from pipeline.export.format import read_export_info
from pipeline.layout import RunLayout
from pipeline.train.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow


def _upload(local: Path, uri: str) -> None:
    fs, path = storage.filesystem(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _inputs(bucket: str, root: Path) -> dict[str, str]:
    finetune = root / "ft"
    finetune.mkdir()
    for name, count in (("train.jsonl", 48), ("heldout.jsonl", 8)):
        lines = (REPO / "data" / "sample" / "finetune" / name).read_text().splitlines()[:count]
        (finetune / name).write_text("\n".join(lines) + "\n")
        _upload(finetune / name, f"{bucket}/inputs/ft/{name}")
    _upload(REPO / "data" / "sample" / "shakespeare" / "macbeth_gut.txt", f"{bucket}/inputs/corpus/macbeth.txt")
    return {"corpus": f"{bucket}/inputs/corpus/", "ft": f"{bucket}/inputs/ft"}


def _config(bucket: str, inputs: dict[str, str], serve_port: int) -> PipelineConfig:
    ft = inputs["ft"]
    settings = tiny_run(
        f"{bucket}/run", "s3test", inputs["corpus"], f"{ft}/train.jsonl", f"{ft}/heldout.jsonl", serve_port
    )
    return load_config(overrides=settings)


def _temp_entries() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith("raygpt-")}


def _run(config: PipelineConfig) -> dict[str, Any]:
    from pipeline.run import run_pipeline

    return run_pipeline(config, serve=True, exit_after_sample=True)


def test_pipeline_on_s3_runs_skips_and_restarts(
    s3: str, serve_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ray import serve

    from pipeline.serve.deploy import APP_NAME

    inputs = _inputs(s3, tmp_path)
    config = _config(s3, inputs, serve_port)
    layout = RunLayout.of(config)
    temp_before = _temp_entries()
    try:
        first = _run(config)
        assert first["pretrain"]["steps"] == 3 and first["finetune"]["steps"] == 2
        assert first["serve"]["sample_completion"] is not None
        exported = first["finetune"]["export"]
        assert exported == layout.stage_export("finetune") and exported.startswith("s3://")
        info, visible = read_export_info(exported)
        assert visible.startswith(f"{exported}/_versions/")  # published through the pointer
        for stage in ("pretrain", "finetune"):  # state, metrics and curves live beside the checkpoints
            state = json.loads(storage.read_bytes(layout.state_file(stage)))
            assert state["status"] == "complete"
            assert storage.read_bytes(layout.metrics_file(stage)).count(b"\n") == state["summary"]["steps"]
            assert storage.read_bytes(layout.loss_curve(stage)).startswith(b"\x89PNG")
        assert json.loads(storage.read_bytes(layout.summary_file))["finetune"]["export"] == exported

        checkpoints = {stage: latest_checkpoint(layout, stage) for stage in ("pretrain", "finetune")}
        capsys.readouterr()
        started = time.perf_counter()
        second = _run(config)
        seconds = time.perf_counter() - started
        out = capsys.readouterr().out
        skipped = ("data is up to date", "finetune_data is up to date", "pretrain: up to date", "finetune: up to date")
        assert all(line in out for line in skipped), out
        assert second["pretrain"]["steps"] == 3 and second["serve"]["sample_completion"] is not None
        assert read_export_info(exported)[1] == visible  # nothing was republished ...
        assert {stage: latest_checkpoint(layout, stage) for stage in checkpoints} == checkpoints  # ... or retrained
        print(f"second run on s3:// with nothing changed: {seconds:.1f} s")

        # New data: the dataset is rebuilt and training starts over (old checkpoints are not resumed, no error).
        _upload(REPO / "data" / "sample" / "shakespeare" / "hamlet_gut.txt", f"{inputs['corpus']}hamlet.txt")
        third = _run(config)
        assert third["data"]["tokens"]["train"] > first["data"]["tokens"]["train"]
        assert third["pretrain"]["steps"] == 3
        assert read_export_info(exported)[1] != visible
        assert read_export_info(exported)[0].weights_sha256 != info.weights_sha256
    finally:
        serve.delete(APP_NAME)
    leaked = _temp_entries() - temp_before
    assert not {name for name in leaked if name.startswith(("raygpt-copy-", "raygpt-downloads", "raygpt-stage"))}
    cache = Path(os.environ["RAYGPT_CACHE_DIR"])
    cached = [p for p in cache.rglob("*") if p.is_file()]
    print(f"after three runs: {len(cached)} cached weight files, {sum(p.stat().st_size for p in cached) / 1e6:.1f} MB")


_SLOW_PUBLISH = """
import sys, time
import pyarrow.fs as pafs
from pipeline.export.format import load_export, save_export

real = pafs.copy_files
def slow(*args, **kwargs):  # each uploaded file is announced, then the upload stalls: the test kills it here
    real(*args, **kwargs)
    print("uploaded", args[1], flush=True)
    time.sleep(60)
pafs.copy_files = slow
model, info = load_export(sys.argv[1])
save_export(model, info.model, sys.argv[2], info.tokenizer)
print("published", flush=True)
"""


def test_a_publish_killed_half_way_leaves_the_previous_export_served(
    s3: str, exports: dict[str, str], serve_port: int, tmp_path: Path
) -> None:
    from helpers.serve import deployed

    from pipeline.export.format import load_export, save_export

    target = f"{s3}/killed/export"
    model, info = load_export(exports["a"])
    save_export(model, info.model, target, info.tokenizer)
    old_info, old_version = read_export_info(target)
    new_sha = read_export_info(exports["b"])[0].weights_sha256
    assert new_sha != old_info.weights_sha256

    writer = subprocess.Popen(
        [sys.executable, "-c", _SLOW_PUBLISH, exports["b"], target],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert writer.stdout is not None
    line = writer.stdout.readline()
    assert line.startswith("uploaded") and "model.safetensors" in line, line  # the new weights are up ...
    os.kill(writer.pid, signal.SIGKILL)  # ... and the publish dies before making them visible
    writer.wait(timeout=30)

    info_after, version_after = read_export_info(target)
    assert version_after == old_version and info_after.weights_sha256 == old_info.weights_sha256
    with deployed(tmp_path, serve_port, target) as url:  # a replica starting now loads the previous export
        response = requests.post(f"{url}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 2}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.headers["x-raygpt-export-sha256"] == old_info.weights_sha256

    # The next publish completes, and removes the killed one's partial upload and its local staging copy.
    staged_by_killed = f"raygpt-stage.tmp-*-{writer.pid}-*"
    assert list(Path(tempfile.gettempdir()).glob(staged_by_killed))
    save_export(load_export(exports["b"])[0], info.model, target, info.tokenizer)
    assert not list(Path(tempfile.gettempdir()).glob(staged_by_killed))
    assert read_export_info(target)[0].weights_sha256 == new_sha
    fs, root = storage.filesystem(f"{target}/_versions")
    versions = [e.base_name for e in fs.get_file_info(pafs.FileSelector(root))]
    assert len(versions) == 2 and old_version.rsplit("/", 1)[-1] in versions


def test_killed_train_worker_resumes_from_the_s3_checkpoint(s3: str, tmp_path: Path, ray_session: None) -> None:
    import threading

    from helpers.ray_state import live_actors, wait_until

    from pipeline.data.build import tokenize_corpus
    from pipeline.train.driver import pretrain

    steps, every = 6, 2
    _upload(REPO / "data" / "sample" / "shakespeare" / "tempest_gut.txt", f"{s3}/resume/corpus/tempest.txt")
    config = load_config(
        overrides=[
            f"run.dir={s3}/resume/run",
            f"data.inputs=[{s3}/resume/corpus/]",
            "data.context_length=32",
            "model.preset=nano",
            f"train.max_steps={steps}",
            f"train.checkpoint_every={every}",
            f"train.eval_every={every}",
            "train.eval_batches=1",
            "train.micro_batch_size=4",
            "train.warmup_steps=2",
            "train.max_failures=1",
        ]
    )
    layout = RunLayout.of(config)
    tokenize_corpus(config, log=lambda _: None)
    snapshot = storage.join(layout.experiment("pretrain"), "checkpoint_manager_snapshot.json")

    def registered() -> int:  # the step of the newest checkpoint Ray Train's controller has registered on S3
        try:
            latest = json.loads(storage.read_bytes(snapshot)).get("latest_checkpoint_result")
        except (OSError, ValueError):
            return 0
        return int(latest["metrics"]["step"]) if latest else 0

    before = {a["ActorID"] for a in live_actors("RayTrainWorker", state=None)}
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(summary=pretrain(config)), daemon=True)
    thread.start()
    workers = wait_until(
        lambda: len(found := [a for a in live_actors("RayTrainWorker") if a["ActorID"] not in before]) == 2 and found,
        180,
        "2 training workers",
    )
    wait_until(lambda: 0 < registered() < steps or not thread.is_alive(), 240, "a checkpoint on S3", poll=0.05)
    assert thread.is_alive(), f"the run ended before the kill: {outcome}"
    resumable = registered()
    killed_at = time.time()
    os.kill(int(workers[-1]["Pid"]), signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive() and "summary" in outcome, f"the run did not recover: {outcome}"
    assert outcome["summary"]["steps"] == steps

    table = [a for a in live_actors("RayTrainWorker", state=None) if a["ActorID"] not in before]
    assert len(table) == 4, f"expected 2 workers and a restarted group of 2, got {len(table)}"
    rows = [json.loads(line) for line in storage.read_bytes(layout.metrics_file("pretrain")).splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), "a step is lost or logged twice"
    # the restarted group resumed from a checkpoint on S3: the steps up to it were restored, not rerun
    assert all(r["time"] < killed_at for r in rows if r["step"] <= resumable)
    assert any(r["time"] > killed_at for r in rows)
    assert storage.exists(storage.join(layout.stage_export("pretrain"), "_PUBLISHED"))
