"""Fault injection against the real stages: a process is SIGKILLed mid-run (by pid, from the test) and the stage
must recover or leave nothing that looks complete.

* Train: one Ray Train worker of a 2-rank DeepSpeed ZeRO-3 run is killed once Ray Train has registered a
  checkpoint and a later step ran; Ray Train restarts the worker group from that checkpoint and the run finishes
  with every step logged once, and the steps it ran twice give the same losses (same weights, same data position).
* Serve: one of two Generator replicas is killed under steady load; only requests in flight may fail (with an
  OpenAI-shaped 503 ``replica_failed``), Serve starts a replacement and every request succeeds again.
* Tokenize: ``raygpt tokenize`` (a driver joined to the session's Ray) is killed mid-way; no manifest appears, its
  Ray actors go away, and a rerun yields the same dataset as an uninterrupted build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers.ray_state import PretrainThread, live_actors, wait_until
from helpers.settings import nano_pretrain

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / "data" / "sample" / "shakespeare"

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------- tokenize


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _dataset_files(location: Path) -> dict[str, str]:
    """sha256 of every file but the manifest (whose "created" differs; the test compares the rest of it)."""
    files = sorted(p for p in location.rglob("*") if p.is_file() and p.name != "manifest.json")
    return {str(p.relative_to(location)): _sha256(p) for p in files}


def _tokenize_settings(run_dir: Path, corpus: Path) -> dict[str, str]:
    return {
        "run.dir": str(run_dir),
        "data.inputs": f"[{corpus}]",
        "data.context_length": "32",
        "data.shard_sequences": "512",
    }


def test_killed_tokenize_leaves_no_manifest_and_rerun_matches_uninterrupted(tmp_path: Path, ray_session: None) -> None:
    import ray

    from pipeline.config import load_config
    from pipeline.data.build import tokenize_corpus

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for play in SHAKESPEARE.glob("*.txt"):  # 5 MB: 5 tokenize tasks, seconds of work, ~80 shards
        shutil.copy(play, corpus / play.name)

    def build(run_dir: Path) -> float:
        """An uninterrupted build, in-process on the session's Ray (the same code `raygpt tokenize` runs)."""
        started = time.monotonic()
        config = load_config(overrides=[f"{k}={v}" for k, v in _tokenize_settings(run_dir, corpus).items()])
        tokenize_corpus(config, log=lambda _: None)
        return time.monotonic() - started

    reference = tmp_path / "reference"
    reference_s = build(reference)
    expected = json.loads((reference / "data" / "manifest.json").read_text())
    assert sum(len(s["shards"]) for s in expected["splits"].values()) >= 10

    address = ray.get_runtime_context().gcs_address
    own_job = ray.get_runtime_context().get_job_id()
    before = {a["ActorID"] for a in live_actors()}
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    # joins the session's Ray; one tokenizer actor works through the 5 file groups in turn, so the first group's
    # shards appear seconds before the last (the pool size is no part of the dataset's identity)
    settings = {**_tokenize_settings(run, corpus), "run.ray_address": address, "data.num_tokenizers": "1"}
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "raygpt"), "tokenize", *(f"--set={k}={v}" for k, v in settings.items())],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # kill once the staging directory holds a few shards: mid-way through writing the dataset
        wait_until(
            lambda: len(list(run.glob(".data.tmp-*/**/*.parquet"))) >= 3 or proc.poll() is not None,
            120,
            "the first shards",
            poll=0.05,
        )
        proc.send_signal(signal.SIGKILL)
    finally:
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL, f"tokenize finished before the kill:\n{output}"
    partial = list(run.glob(".data.tmp-*/**/*.parquet"))
    assert partial, "the staging directory should hold the killed build's shards"
    assert not (run / "data").exists(), "a half-written dataset must never appear at the final location"

    # the killed driver's job ends, and with it its tokenizer actors and tasks
    def leaked() -> list[dict[str, Any]]:
        return [a for a in live_actors() if a["ActorID"] not in before and a["JobID"] != own_job]

    wait_until(lambda: not leaked(), 30, "the killed tokenize driver's actors to exit")

    killed_s = time.monotonic() - started
    rerun_s = build(run)
    got = json.loads((run / "data" / "manifest.json").read_text())
    assert got.pop("created") and expected.pop("created")
    assert got == expected
    assert _dataset_files(run / "data") == _dataset_files(reference / "data")
    # The killed command could not release its run-dir lock; the next command that locks the run dir finds the
    # holder dead on this host, takes the lock over, finds the dataset up to date, and releases it.
    assert (run / "raygpt.lock").is_file()
    again = subprocess.run(
        [str(Path(sys.executable).parent / "raygpt"), "tokenize", *(f"--set={k}={v}" for k, v in settings.items())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    leftovers = sorted(p.name for p in run.iterdir() if p.name != "data")
    assert not leftovers, f"staging leftovers of the killed build: {leftovers}"
    shards = len(_dataset_files(reference / "data"))
    print(
        f"\ntokenize: reference {reference_s:.1f} s; killed after {len(partial)} of {shards} shards "
        f"({killed_s:.1f} s incl. actor cleanup); rerun {rerun_s:.1f} s"
    )


# ---------------------------------------------------------------------------------------------- train

TRAIN_STEPS, CHECKPOINT_EVERY = 6, 2


def _registered_checkpoint_step(experiment: Path) -> int:
    """The step of the latest checkpoint Ray Train's controller has registered (0 before the first).

    A worker's ``ray.train.report`` only queues its checkpoint; the controller registers it at its next poll of the
    worker group (every 2 s), and only a registered checkpoint is what a restarted group resumes from. The controller
    records what it registered in its checkpoint-manager snapshot, which is what this reads."""
    snapshot = experiment / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, json.JSONDecodeError):  # not written yet, or being rewritten
        return 0
    return int(latest["metrics"]["step"]) if latest else 0


def _metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl that may be being appended to (a torn last line is skipped)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def test_killed_train_worker_resumes_from_checkpoint_without_lost_or_repeated_steps(
    tmp_path: Path, ray_session: None
) -> None:
    from pipeline.config import load_config
    from pipeline.data.build import tokenize_corpus
    from pipeline.layout import RunLayout

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for play in ("macbeth_gut.txt", "tempest_gut.txt", "julius_caesar_gut.txt"):
        shutil.copy(SHAKESPEARE / play, corpus / play)
    run = tmp_path / "run"
    config = load_config(
        overrides=nano_pretrain(
            run,
            corpus,
            f"train.max_steps={TRAIN_STEPS}",
            f"train.checkpoint_every={CHECKPOINT_EVERY}",
            f"train.eval_every={CHECKPOINT_EVERY}",
            "train.eval_batches=2",
            "train.max_failures=1",
        )
    )
    tokenize_corpus(config, log=lambda _: None)

    training = PretrainThread(config)
    thread, outcome, workers = training.thread, training.outcome, training.workers
    live = run / "pretrain" / "metrics.jsonl"  # rank 0 appends a row per step
    experiment = Path(RunLayout.of(config).experiment("pretrain"))  # Ray Train's storage_path is the run dir

    def registered_and_past() -> list[dict[str, Any]] | bool:
        registered = _registered_checkpoint_step(experiment)
        rows = _metrics(live)
        ready = 0 < registered < TRAIN_STEPS and rows and rows[-1]["step"] > registered
        return rows if ready else not thread.is_alive()

    seen = wait_until(registered_and_past, 180, "a registered checkpoint and a step past it", poll=0.02)
    assert thread.is_alive() and isinstance(seen, list), f"the run ended before the kill: {outcome}"
    victim = workers[-1]
    registered = _registered_checkpoint_step(experiment)
    killed_at = time.time()
    os.kill(int(victim["Pid"]), signal.SIGKILL)
    registered_after_kill = _registered_checkpoint_step(experiment)
    thread.join(timeout=300)
    assert not thread.is_alive(), "the run did not finish after a worker was killed"
    assert "error" not in outcome, f"the run did not recover: {outcome.get('error')!r}"
    summary = outcome["summary"]
    assert summary["steps"] == TRAIN_STEPS

    # Ray Train noticed the death and started a new worker group (2 new workers) from the checkpoint
    table = training.started_since()
    assert table[victim["ActorID"]]["State"] == "DEAD"
    assert len(table) == 4, f"expected the 2 workers and a restarted group of 2, got {len(table)} workers"
    assert {a["Pid"] for a in table.values()} > {a["Pid"] for a in workers}

    rows = _metrics(run / "pretrain" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, TRAIN_STEPS + 1)), "a step is lost or logged twice"
    # the steps run before the kill and again after the restart got the same data (tokens) and the same loss
    before_kill = {r["step"]: r for r in seen}
    redone = [r for r in rows if r["step"] in before_kill and r["time"] > killed_at]
    assert redone, f"no step ran twice: kill too late? steps seen before the kill {sorted(before_kill)}"
    for row in rows:
        if row["step"] in before_kill:
            first = before_kill[row["step"]]
            assert row["tokens"] == first["tokens"], row["step"]
            assert abs(row["loss"] - first["loss"]) <= 1e-6, (row["step"], row["loss"], first["loss"])
    # the restarted group resumed from the checkpoint registered at the kill: the steps up to it were restored, not
    # rerun (a checkpoint the controller registered in the instant between the two reads would do as well)
    resumed_from = min(r["step"] for r in rows if r["time"] > killed_at) - 1
    assert registered <= resumed_from <= registered_after_kill, (registered, resumed_from, registered_after_kill)
    assert resumed_from % CHECKPOINT_EVERY == 0
    assert all(r["time"] < killed_at for r in rows if r["step"] <= resumed_from)
    print(
        f"\ntrain: killed worker pid {victim['Pid']} after step {seen[-1]['step']}; restarted from step "
        f"{resumed_from}; steps rerun with equal losses {[r['step'] for r in redone]}; "
        f"step times {[round(r['step_time_s'], 2) for r in rows]}"
    )


# ---------------------------------------------------------------------------------------------- serve

GENERATOR = "ServeReplica:raygpt:Generator"
MAX_ONGOING = 4
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


def _outcome(response: requests.Response, stream: bool) -> tuple[str, str, str | None]:
    """("ok" | "error" | "malformed", detail, replica id) of one completion."""
    replica = response.headers.get("x-raygpt-replica")
    if response.status_code != 200:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return "malformed", f"{response.status_code} {response.text[:200]}", replica
        shaped = set(error) == OPENAI_ERROR_KEYS and response.status_code == 503 and error["code"] == "replica_failed"
        return ("error" if shaped else "malformed"), f"{response.status_code} {json.dumps(error)}", replica
    if not stream:
        body = response.json()
        return ("ok" if body["choices"][0]["finish_reason"] else "malformed"), "", replica
    events, done = [], False
    for raw in response.iter_lines(decode_unicode=True):
        if raw == "data: [DONE]":
            done = True
        elif raw:
            events.append(json.loads(raw.removeprefix("data: ")))
    errors = [e["error"] for e in events if "error" in e]
    if errors:  # the stream had started (200) when the replica died: an error event, then [DONE]
        shaped = done and set(errors[0]) == OPENAI_ERROR_KEYS and errors[0]["code"] == "replica_failed"
        return ("error" if shaped else "malformed"), f"200 stream {json.dumps(errors[0])}", replica
    finished = done and any(c.get("finish_reason") for e in events for c in e.get("choices", []))
    return ("ok" if finished else "malformed"), "", replica


def test_killed_serve_replica_is_replaced_and_only_in_flight_requests_fail(
    tmp_path: Path, serve_port: int, exports: dict[str, str]
) -> None:
    from helpers.serve import deployed
    from ray import serve

    from pipeline.serve.deploy import APP_NAME

    settings = {"num_replicas": 2, "num_cpus_per_replica": 0.5, "max_ongoing_requests": MAX_ONGOING}
    with deployed(tmp_path, serve_port, exports["a"], max_batch_size=MAX_ONGOING, **settings) as url:
        replicas = wait_until(lambda: len(found := live_actors(GENERATOR)) == 2 and found, 60, "2 Generator replicas")
        records: list[tuple[float, float, bool, str, str, str | None]] = []
        stop = threading.Event()

        def client(worker: int) -> None:
            session = requests.Session()
            sent = 0
            while not stop.is_set():
                stream = sent % 2 == 1  # alternate plain and streamed completions
                sent += 1
                body = {"prompt": f"ROMEO {worker}:", "max_tokens": 8, "temperature": 0, "stream": stream}
                started = time.time()
                try:
                    response = session.post(f"{url}/v1/completions", json=body, timeout=60, stream=stream)
                    outcome = _outcome(response, stream)
                except requests.RequestException as exc:  # a reset or a hang: never acceptable
                    outcome = ("connection", repr(exc), None)
                records.append((started, time.time(), stream, *outcome))

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: sum(r[3] == "ok" for r in records) >= 8, 60, "steady load")
        victim = replicas[0]
        victim_id = victim["Name"].rsplit("#", 1)[-1]
        killed_at = time.time()
        os.kill(int(victim["Pid"]), signal.SIGKILL)

        def replaced() -> bool:
            alive = live_actors(GENERATOR)
            if len(alive) != 2 or victim["ActorID"] in {a["ActorID"] for a in alive}:
                return False
            status = serve.status().applications[APP_NAME]
            return status.status == "RUNNING" and status.deployments["Generator"].status == "HEALTHY"

        wait_until(replaced, 120, "Serve to replace the killed replica", poll=0.25)
        recovered_at = time.time()
        new = [a for a in live_actors(GENERATOR) if a["ActorID"] not in {r["ActorID"] for r in replicas}]
        assert len(new) == 1 and new[0]["Pid"] != victim["Pid"]
        new_id = new[0]["Name"].rsplit("#", 1)[-1]
        wait_until(lambda: any(r[0] > recovered_at and r[5] == new_id for r in records), 60, "the new replica to serve")
        stop.set()
        for thread in threads:
            thread.join(timeout=90)
        assert not any(t.is_alive() for t in threads), "a client hung"

    failed = [r for r in records if r[3] != "ok"]
    summary = (
        f"{len(failed)} of {len(records)} requests failed; in flight at the kill "
        f"{sum(r[0] <= killed_at < r[1] for r in records)}; replaced in {recovered_at - killed_at:.1f} s; "
        f"failures: {[(r[2], r[4], round(r[0] - killed_at, 2)) for r in failed]}"
    )
    print("\nserve:", summary)
    assert all(r[3] == "error" for r in failed), summary  # a 503 replica_failed / that error event; no reset
    assert all(r[0] <= killed_at < r[1] for r in failed), summary  # only requests in flight at the kill
    assert len(failed) <= MAX_ONGOING, summary
    assert any(r[0] <= killed_at and r[5] == victim_id for r in records), "the killed replica served no request"
    after = [r for r in records if r[0] > recovered_at]
    assert after and all(r[3] == "ok" for r in after), summary
    survivor = ({r["Name"].rsplit("#", 1)[-1] for r in replicas} - {victim_id}).pop()
    assert new_id in {r[5] for r in after} <= {new_id, survivor}


def test_new_build_removes_only_abandoned_staging_dirs(tmp_path: Path) -> None:
    """What a killed build left beside the target goes; a build still running (here, or on another host sharing
    the filesystem) keeps its staging directory."""
    from pipeline.storage import staging_dir_for

    target = tmp_path / "data"
    live = staging_dir_for(target)  # this process: alive
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    abandoned = tmp_path / f".data.tmp-0123abcd-{int(dead.stdout)}-{host}"
    elsewhere = tmp_path / f".data.tmp-0123abcd-{int(dead.stdout)}-not-{host}"
    trash = tmp_path / ".data.old-0123abcd"
    other_target = tmp_path / f".dataset.tmp-0123abcd-{int(dead.stdout)}-{host}"
    for folder in (abandoned, elsewhere, trash, other_target):
        (folder / "train").mkdir(parents=True)
    fresh = staging_dir_for(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, fresh, elsewhere, other_target))
