"""``serve.high_throughput``: ``raygpt serve`` starts its local Ray in Ray Serve's high-throughput mode (HAProxy on
serve.port in front of an ingress that answers HTTP itself, gRPC to the Generator), and the endpoint answers the
clients as in the standard mode: plain and streamed completions, 401 without the key. Without a key the mode is
refused before anything starts, since the ingress replica's own port listens on every interface. Ctrl-C stops it
all, HAProxy included."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers.cluster import free_ports, tagged_pids
from helpers.serve import raygpt_serve, sse_events

from pipeline.config import API_KEY_ENV, ConfigError, PipelineConfig

KEY = "sk-high-throughput-test"


def test_high_throughput_mode_needs_an_api_key(exports: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.serve.deploy import build_app

    monkeypatch.delenv(API_KEY_ENV, raising=False)

    def app(**serve: Any) -> Any:
        return build_app(PipelineConfig.model_validate({"serve": {"high_throughput": True, **serve}}), exports["a"])

    with pytest.raises(ConfigError) as refused:
        app()  # on loopback, where the standard mode needs no key
    message = str(refused.value)
    assert "serve.high_throughput" in message and API_KEY_ENV in message and "every interface" in message
    assert app(api_key="sk-x") is not None
    assert app(allow_unauthenticated=True) is not None


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="HAProxy is built for Linux; finds it via /proc")
def test_raygpt_serve_in_high_throughput_mode_answers_openai_clients(tmp_path: Path, exports: dict[str, str]) -> None:
    (port,) = free_ports(1)
    args = ["--export", exports["a"], "--set", f"serve.port={port}", "--set", "serve.high_throughput=true"]
    url = f"http://127.0.0.1:{port}"
    with raygpt_serve(tmp_path, args, {API_KEY_ENV: KEY}) as served:
        ray_processes = tagged_pids(served.tag)
        assert any("haproxy" in _command_line(pid) for pid in ray_processes), "no HAProxy among the Ray processes"

        auth = {"Authorization": f"Bearer {KEY}"}
        body = {"model": "raygpt", "prompt": "ROMEO:", "max_tokens": 8, "temperature": 0}
        answer = requests.post(f"{url}/v1/completions", json=body, headers=auth, timeout=60)
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        assert choice["finish_reason"] == "length" and answer.json()["usage"]["completion_tokens"] == 8
        with requests.post(
            f"{url}/v1/completions", json=body | {"stream": True}, headers=auth, timeout=60, stream=True
        ) as streamed:
            events = sse_events(streamed)
        assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == choice["text"]
        refused = requests.post(f"{url}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 2}, timeout=60)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"

        served.ctrl_c(timeout_s=180)
