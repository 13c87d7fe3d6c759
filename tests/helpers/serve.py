"""Helpers for the tests that deploy the real Serve application (tests/serve/, tests/integration/test_faults.py):
deploy an export for the length of a ``with`` block, run ``raygpt serve`` as a terminal would, and read
OpenAI-shaped errors and server-sent events. The session's Serve proxy and the nano exports are fixtures in
tests/conftest.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from helpers import REPO
from helpers.cluster import TAG_VAR, tagged_pids
from pipeline.config import PipelineConfig


def serve_config(tmp_path: Path, port: int, **serve: Any) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {"run": {"dir": str(tmp_path)}, "serve": {"port": port, "request_timeout_s": 30, **serve}}
    )


@contextmanager
def deployed(tmp_path: Path, port: int, export: str, **serve: Any) -> Iterator[str]:
    from ray import serve as ray_serve

    from pipeline.serve.deploy import APP_NAME, deploy

    url = deploy(serve_config(tmp_path, port, **serve), export)
    try:
        yield url
    finally:
        ray_serve.delete(APP_NAME)


@dataclass
class ServeProcess:
    process: subprocess.Popen[bytes]
    log: Path
    tag: str  # in the environment of every process of the local Ray it started

    def output(self) -> str:
        return self.log.read_text()

    def ctrl_c(self, timeout_s: float) -> str:
        """Ctrl-C to its process group, as a terminal sends it; returns its output once it exited 0 and every
        process it started is gone."""
        os.killpg(self.process.pid, signal.SIGINT)
        self.process.wait(timeout=timeout_s)
        output = self.output()
        assert self.process.returncode == 0, output[-3000:]
        deadline = time.monotonic() + 60
        while tagged_pids(self.tag) and time.monotonic() < deadline:
            time.sleep(1)
        assert tagged_pids(self.tag) == []
        return output


@contextmanager
def raygpt_serve(tmp_path: Path, args: list[str], env: dict[str, str] | None = None) -> Iterator[ServeProcess]:
    """``raygpt serve ARGS`` with its own local Ray, in its own session and process group like a shell job, up
    once it says Ctrl-C stops it; whatever is left of it is killed when the block ends."""
    tag = uuid.uuid4().hex
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_SERVE_"))}
    environ |= (env or {}) | {TAG_VAR: tag}
    command = [sys.executable, "-m", "pipeline", "serve", "--set", f"run.dir={tmp_path}", *args]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    served = ServeProcess(process, log, tag)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None and "Ctrl-C stops" not in served.output():
            time.sleep(1)
        assert process.poll() is None, served.output()[-3000:]
        yield served
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        for pid in tagged_pids(tag):
            os.kill(pid, signal.SIGKILL)


def expect_error(response: requests.Response, status: int, code: Any = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def sse_events(response: requests.Response) -> list[dict[str, Any]]:
    """Parse server-sent events the way OpenAI clients do: 'data: ' lines, until 'data: [DONE]'."""
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events, done = [], False
    for raw in response.iter_lines(decode_unicode=True):
        if not raw:
            continue
        assert raw.startswith("data: "), raw
        data = raw.removeprefix("data: ")
        if data == "[DONE]":
            done = True
            break
        events.append(json.loads(data))
    assert done
    return events


def wait_idle(stats: Any) -> None:
    idle = {"running": 0, "waiting": 0, "attached": 0}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and stats.remote().result() != idle:
        time.sleep(0.1)
    assert stats.remote().result() == idle
