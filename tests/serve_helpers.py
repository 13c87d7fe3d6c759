"""Shared by the tests that deploy the real Serve application (tests/test_serve.py, test_hostile.py,
test_security.py): one Serve HTTP proxy on a free loopback port per session, nano exports, and HTTP helpers.

The fixtures are re-exported by tests/conftest.py.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from pipeline.config import PipelineConfig
from pipeline.export import save_export
from pipeline.model import GPT
from pipeline.presets import PRESETS
from pipeline.tokenizer import get_tokenizer

NANO = PRESETS["nano"].model  # context 64


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def serve_port(ray_session: None) -> Iterator[int]:
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("exports")
    tokenizer = get_tokenizer()
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        out[name] = save_export(GPT(NANO), NANO, root / name, tokenizer.info(), metadata={"stage": "test"})
    return out


@pytest.fixture(scope="session")
def long_export(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A one-layer model with a long context: requests that run for seconds."""
    from pipeline.model import GPTConfig

    cfg = GPTConfig(vocab_size=NANO.vocab_size, context_length=2048, n_layer=1, n_head=1, d_model=16)
    torch.manual_seed(0)
    return save_export(GPT(cfg), cfg, tmp_path_factory.mktemp("long") / "export", get_tokenizer().info())


def _config(tmp_path: Path, port: int, **serve: Any) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {"run": {"dir": str(tmp_path)}, "serve": {"port": port, "request_timeout_s": 30, **serve}}
    )


@contextmanager
def _deploy(tmp_path: Path, port: int, export: str, **serve: Any) -> Iterator[str]:
    from ray import serve as ray_serve

    from pipeline.serve import APP_NAME, deploy

    url = deploy(_config(tmp_path, port, **serve), export)
    try:
        yield url
    finally:
        ray_serve.delete(APP_NAME)


def _error(response: requests.Response, status: int, code: Any = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def _sse(response: requests.Response) -> list[dict[str, Any]]:
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


def _wait_idle(stats: Any) -> None:
    idle = {"running": 0, "waiting": 0, "attached": 0}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and stats.remote().result() != idle:
        time.sleep(0.1)
    assert stats.remote().result() == idle
