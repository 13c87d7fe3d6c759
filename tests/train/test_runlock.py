"""One raygpt process at a time in a run directory: the run-dir lock on local disk and on an S3-protocol store
(the session's moto server), held by real processes that exit, are interrupted (SIGINT) or are killed (SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.layout import RunLayout
from pipeline.runlock import RunDirBusy, run_lock

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def holder(run_dir: str, command: str = "pretrain", **lock_options: float) -> Iterator[subprocess.Popen]:
    """Another process holding the run dir's lock until it is signalled (it prints ``held`` once it has it)."""
    script = textwrap.dedent(
        f"""
        import time
        from pipeline.runlock import run_lock
        with run_lock({run_dir!r}, {command!r}, **{lock_options!r}):
            print("held", flush=True)
            while True:
                time.sleep(0.1)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip() == "held", (
            f"the holder did not take the lock: {line!r} {proc.stderr.read() if proc.stderr else ''}"
        )
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def _lock_file(run_dir: str) -> str:
    return RunLayout(run_dir).lock_file


def test_second_holder_is_refused_with_the_holder_named_and_signals_release(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    with holder(run_dir) as proc:
        with pytest.raises(RunDirBusy) as busy:
            with run_lock(run_dir, "finetune"):
                pytest.fail("entered a run dir another process holds")
        message = str(busy.value)
        assert f"host {socket.gethostname()}" in message and f"pid {proc.pid}" in message
        assert "raygpt pretrain" in message and "since 20" in message and run_dir in message
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) != 0
    assert not Path(_lock_file(run_dir)).exists(), "Ctrl-C must release the lock"
    with run_lock(run_dir, "finetune"):
        assert json.loads(Path(_lock_file(run_dir)).read_text())["pid"] == os.getpid()
    assert not Path(_lock_file(run_dir)).exists()
    with holder(run_dir) as proc:  # a stopped job gets SIGTERM
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert not Path(_lock_file(run_dir)).exists(), "SIGTERM must release the lock"


def test_lock_is_released_on_error_and_nested_stages_share_it(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match="boom"):
        with run_lock(run_dir, "pretrain"):
            raise ValueError("boom")
    assert not Path(_lock_file(run_dir)).exists()
    with run_lock(run_dir, "run"):  # `raygpt run` holds it while its stages take it again
        with run_lock(run_dir, "pretrain"):
            pass
        assert Path(_lock_file(run_dir)).exists(), "the inner stage must not release the outer hold"
    assert not Path(_lock_file(run_dir)).exists()


def test_lock_of_a_killed_process_on_this_host_is_taken_over(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    with holder(run_dir) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert Path(_lock_file(run_dir)).exists(), "SIGKILL runs no cleanup"
    with run_lock(run_dir, "pretrain"):
        assert json.loads(Path(_lock_file(run_dir)).read_text())["pid"] == os.getpid()


def test_lock_of_a_process_on_another_host_is_not_judged(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = {"owner": "x", "host": "another-host", "pid": 1, "command": "run", "since": "2026-01-01T00:00:00Z"}
    Path(_lock_file(str(run_dir))).write_text(json.dumps(record))
    with pytest.raises(RunDirBusy, match=r"host another-host.*pid 1.*delete"):
        with run_lock(str(run_dir), "pretrain"):
            pass


def test_remote_lock_is_exclusive_renewed_and_expires_after_its_holder_dies(s3: str) -> None:
    run_dir = f"{s3}/runlock-{time.time_ns()}"
    with holder(run_dir, ttl=3.0, settle=0.2) as proc:
        time.sleep(4)  # longer than the ttl: only the holder's renewals keep the lock
        with pytest.raises(RunDirBusy) as busy:
            with run_lock(run_dir, "finetune", settle=0.2):
                pass
        assert f"pid {proc.pid}" in str(busy.value) and "expires" in str(busy.value)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert storage.exists(_lock_file(run_dir)), "SIGKILL runs no cleanup"
    time.sleep(3.5)  # past the last renewal's expiry
    with run_lock(run_dir, "finetune", settle=0.2):
        assert json.loads(storage.read_bytes(_lock_file(run_dir)))["pid"] == os.getpid()
    assert not storage.exists(_lock_file(run_dir))


def test_remote_lock_is_released_on_ctrl_c(s3: str) -> None:
    run_dir = f"{s3}/runlock-{time.time_ns()}"
    with holder(run_dir, settle=0.2) as proc:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) != 0
    assert not storage.exists(_lock_file(run_dir))


def test_stages_refuse_a_run_dir_in_use_and_leave_it_alone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main
    from pipeline.config import load_config
    from pipeline.train.driver import finetune, pretrain

    run_dir = tmp_path / "run"
    experiment = run_dir / "raygpt-pretrain"  # another run's, still without a checkpoint
    experiment.mkdir(parents=True)
    (experiment / "checkpoint_manager_snapshot.json").write_text("{}")
    config = load_config(overrides=[f"run.dir={run_dir}"])
    with holder(str(run_dir), "run") as proc:
        for stage in (pretrain, finetune):
            with pytest.raises(RunDirBusy, match=f"pid {proc.pid}"):
                stage(config)
        for command in ("run", "pretrain", "tokenize"):
            assert main([command, "--set", f"run.dir={run_dir}"]) == 2
            assert f"in use by `raygpt run` on host {socket.gethostname()} (pid {proc.pid}" in capsys.readouterr().err
    assert (experiment / "checkpoint_manager_snapshot.json").exists()
