"""Helpers for the tests that deploy the real Serve application (tests/serve/, tests/integration/test_faults.py):
deploy an export for the length of a ``with`` block, and read OpenAI-shaped errors and server-sent events. The
session's Serve proxy and the nano exports are fixtures in tests/conftest.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

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
