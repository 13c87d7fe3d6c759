"""Real HTTP against a real Ray Serve application (pipeline.serve.app) over nano exports in a tmp dir.

One Serve HTTP proxy (a free port) for the whole session; each group of tests deploys the application with the
settings it needs and deletes it afterwards, so the shared CPUs are free again.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from helpers.serve import deployed, expect_error, serve_config, sse_events, wait_idle

from pipeline.export.format import read_export_info
from pipeline.model.tokenizer import get_tokenizer

# ---------------------------------------------------------------------------------------------- one replica


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, serve_port: int, exports: dict[str, str]) -> Iterator[str]:
    with deployed(tmp_path_factory.mktemp("run"), serve_port, exports["a"], max_ongoing_requests=8) as base:
        yield base


def test_completion(url: str, exports: dict[str, str]) -> None:
    body = {"model": "raygpt", "prompt": "ROMEO:", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    r = requests.post(f"{url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion" and data["model"] == "raygpt" and data["id"].startswith("cmpl-")
    (choice,) = data["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("length", "stop") and choice["text"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert "".join(lp["tokens"]) == choice["text"] and all(len(t) == 2 for t in lp["top_logprobs"])
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    assert r.headers["x-raygpt-export-sha256"] == read_export_info(exports["a"])[0].weights_sha256
    again = requests.post(f"{url}/v1/completions", json=body, timeout=30).json()
    assert again["choices"][0]["text"] == choice["text"]  # greedy is deterministic


def test_list_prompts_n_seed_and_token_prompts(url: str) -> None:
    body = {"prompt": ["Hello", "To be or not"], "max_tokens": 5, "n": 2, "seed": 11, "temperature": 1.0}
    first = requests.post(f"{url}/v1/completions", json=body, timeout=30).json()
    assert [c["index"] for c in first["choices"]] == [0, 1, 2, 3]
    assert first["usage"]["prompt_tokens"] == 1 + 4
    second = requests.post(f"{url}/v1/completions", json=body, timeout=30).json()
    assert [c["text"] for c in second["choices"]] == [c["text"] for c in first["choices"]]  # seeded
    ids = get_tokenizer().encode("Hello")
    by_ids = {"prompt": ids, "max_tokens": 5, "temperature": 0}
    by_text = {"prompt": "Hello", "max_tokens": 5, "temperature": 0}
    a = requests.post(f"{url}/v1/completions", json=by_ids, timeout=30).json()
    b = requests.post(f"{url}/v1/completions", json=by_text, timeout=30).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    batch = requests.post(f"{url}/v1/completions", json={**by_ids, "prompt": [ids, ids]}, timeout=30).json()
    assert len(batch["choices"]) == 2
    echo = requests.post(f"{url}/v1/completions", json={**by_text, "echo": True}, timeout=30).json()
    assert echo["choices"][0]["text"] == "Hello" + b["choices"][0]["text"]


def test_streaming_matches_non_streaming(url: str) -> None:
    body = {"prompt": "ROMEO:", "max_tokens": 12, "temperature": 0}
    whole = requests.post(f"{url}/v1/completions", json=body, timeout=30).json()["choices"][0]
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with requests.post(f"{url}/v1/completions", json=stream_body, stream=True, timeout=30) as r:
        events = sse_events(r)
    chunks = [e for e in events if e["choices"]]
    assert all(e["object"] == "text_completion" and len({e["id"] for e in events}) == 1 for e in events)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}


def test_stop_strings(url: str) -> None:
    body = {"prompt": "ROMEO:", "max_tokens": 12, "temperature": 0}
    text = requests.post(f"{url}/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
    stop = text[4:7]
    choice = requests.post(f"{url}/v1/completions", json={**body, "stop": [stop]}, timeout=30).json()["choices"][0]
    assert choice["text"] == text[: text.find(stop)] and choice["finish_reason"] == "stop"
    with requests.post(f"{url}/v1/completions", json={**body, "stop": stop, "stream": True}, stream=True) as r:
        assert "".join(e["choices"][0]["text"] for e in sse_events(r)) == choice["text"]


def test_chat_models_health_openapi(url: str, exports: dict[str, str]) -> None:
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    r = requests.post(f"{url}/v1/chat/completions", json=chat, timeout=30)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["choices"][0]["message"]["role"] == "assistant"
    with requests.post(f"{url}/v1/chat/completions", json={**chat, "stream": True}, stream=True, timeout=30) as r:
        events = sse_events(r)
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert streamed == data["choices"][0]["message"]["content"]  # same greedy reply either way
    models = requests.get(f"{url}/v1/models", timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "raygpt"
    assert models["data"][0]["object"] == "model" and "owned_by" in models["data"][0]
    # what a client needs (the context length), never where the weights are stored
    assert models["data"][0]["max_model_len"] == 64 and models["data"][0]["root"] == "raygpt"
    assert str(Path(exports["a"]).parent) not in json.dumps(models)
    assert requests.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(spec["paths"])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ("{not json", None),
        ("[]", None),
        ("null", None),
        ('"a string"', None),
        (json.dumps({"prompt": 3}), "prompt"),
        (json.dumps({"prompt": "x", "max_tokens": "ten"}), "max_tokens"),
        (json.dumps({"prompt": "x", "max_tokens": -1}), "max_tokens"),
        (json.dumps({"prompt": "x", "max_tokens": True}), "max_tokens"),
        (json.dumps({"prompt": "x", "temperature": 5}), "temperature"),
        (json.dumps({"prompt": "x", "top_p": 0}), "top_p"),
        (json.dumps({"prompt": "x", "n": 1000}), "n"),
        (json.dumps({"prompt": "x", "logprobs": 9}), "logprobs"),
        (json.dumps({"prompt": "x", "stream": "yes"}), "stream"),
        (json.dumps({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json.dumps({"prompt": "x", "stop": [""]}), "stop"),
        (json.dumps({"prompt": []}), "prompt"),
        (json.dumps({"prompt": [[]]}), "prompt"),
        (json.dumps({"prompt": [1, "a"]}), "prompt"),
        (json.dumps({"prompt": [99999999]}), "prompt"),
        (json.dumps({"prompt": "x", "presence_penalty": 0.5}), "presence_penalty"),
        (json.dumps({"prompt": "x", "logit_bias": {"1": 5}}), "logit_bias"),
        (json.dumps({"prompt": "x", "suffix": "y"}), "suffix"),
        (json.dumps({"prompt": "x", "best_of": 3}), "best_of"),
        (json.dumps({"prompt": "x", "stream_options": {"include_usage": 3}}), "stream_options"),
        (json.dumps({"prompt": ["a"] * 40, "n": 2}), "n"),
        (json.dumps({"prompt": "x", "temperature": float("nan")}), "temperature"),
        (json.dumps({"messages": []}), "messages"),
        (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), "messages"),
    ],
)
def test_bad_requests_are_400_in_openai_shape(url: str, body: str, param: str | None) -> None:
    route = "chat/completions" if "messages" in body else "completions"
    r = requests.post(f"{url}/v1/{route}", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    error = expect_error(r, 400)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error


def test_odd_bodies_and_seeds_never_500(url: str) -> None:
    for headers, data in [
        ({"Content-Type": "text/plain"}, b'{"prompt": "x"'),
        ({}, b""),
        ({"Content-Type": "application/json"}, b"\xff\xfe not utf-8"),
    ]:
        expect_error(requests.post(f"{url}/v1/completions", data=data, headers=headers, timeout=30), 400)
    for seed in (-1, 2**64 + 5, -(2**80)):
        body = {"prompt": "x", "max_tokens": 2, "seed": seed, "n": 2}
        assert requests.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200


def test_context_length_unknown_model_and_route(url: str) -> None:
    r = requests.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 64}, timeout=30)
    assert "maximum context length is 64" in expect_error(r, 400, "context_length_exceeded")["message"]
    long_prompt = {"prompt": list(range(60)), "max_tokens": 5}
    expect_error(requests.post(f"{url}/v1/completions", json=long_prompt, timeout=30), 400, "context_length_exceeded")
    r = requests.post(f"{url}/v1/completions", json={"model": "gpt-4", "prompt": "x"}, timeout=30)
    assert expect_error(r, 404, "model_not_found")["param"] == "model"
    expect_error(requests.get(f"{url}/v1/nothing", timeout=10), 404)
    expect_error(requests.get(f"{url}/v1/completions", timeout=10), 405)
    # no key configured: no Authorization needed (and a stray one is fine)
    ok = requests.get(f"{url}/v1/models", headers={"Authorization": "Bearer whatever"}, timeout=10)
    assert ok.status_code == 200


# ------------------------------------------------------------------------- two replicas, API key


def test_two_replicas_with_api_key_over_ray_actor_calls(
    tmp_path: Path, serve_port: int, exports: dict[str, str]
) -> None:
    """serve.replica_grpc false: the ingress reaches the replicas by Ray actor calls (every other test here goes
    over Serve's gRPC), routes across both and streams their answers back the same way."""
    settings = {"num_replicas": 2, "max_ongoing_requests": 1, "max_batch_size": 1, "api_key": "s3cret"}
    app = deployed(tmp_path, serve_port, exports["a"], replica_grpc=False, **settings)
    with app as url:
        expect_error(requests.get(f"{url}/v1/models", timeout=10), 401, "invalid_api_key")
        bad = requests.post(f"{url}/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer no"})
        assert expect_error(bad, 401)["type"] == "authentication_error"
        assert requests.get(f"{url}/health", timeout=10).status_code == 200  # health stays open
        auth = {"Authorization": "Bearer s3cret"}
        body = {"prompt": "Hello", "max_tokens": 40, "temperature": 0}

        def call(_: int) -> tuple[int, str, float, float]:
            start = time.monotonic()
            r = requests.post(f"{url}/v1/completions", json=body, headers=auth, timeout=60)
            return r.status_code, r.headers.get("x-raygpt-replica", ""), start, time.monotonic()

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(call, range(6)))
        assert [status for status, *_ in results] == [200] * 6
        assert len({replica for _, replica, *_ in results}) == 2
        with requests.post(f"{url}/v1/completions", json={**body, "stream": True}, headers=auth, stream=True) as r:
            streamed = "".join(e["choices"][0]["text"] for e in sse_events(r))
        whole = requests.post(f"{url}/v1/completions", json=body, headers=auth, timeout=60).json()
        assert streamed == whole["choices"][0]["text"]


# ------------------------------------------------------------------------- autoscaling, backpressure


def test_autoscaling_settings_and_503_under_overload(tmp_path: Path, serve_port: int, long_export: str) -> None:
    from ray import serve

    settings = {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 1}
    app = deployed(
        tmp_path,
        serve_port,
        long_export,
        autoscaling=settings,
        max_ongoing_requests=1,
        max_queued_requests=1,
        max_batch_size=1,
    )
    with app as url:
        status = serve.status().applications["raygpt"].deployments["Generator"]
        assert status.status == "HEALTHY"
        from ray.serve.context import _get_global_client  # Serve's own view of the deployed options

        details = _get_global_client().get_serve_details()["applications"]["raygpt"]["deployments"]["Generator"]
        options = details["deployment_config"]
        assert options["autoscaling_config"]["max_replicas"] == 1
        assert options["autoscaling_config"]["target_ongoing_requests"] == 1
        assert options["max_ongoing_requests"] == 1 and options["max_queued_requests"] == 1
        body = {"prompt": "Hello", "max_tokens": 300, "temperature": 0}  # ~1 s each: the queue fills

        def call(_: int) -> tuple[requests.Response, float]:
            start = time.monotonic()
            r = requests.post(f"{url}/v1/completions", json=body, timeout=60)
            return r, time.monotonic() - start

        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(call, range(10)))
        codes = [r.status_code for r, _ in results]
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
        for r, elapsed in results:
            if r.status_code == 503:
                assert expect_error(r, 503, "overloaded")["type"] == "server_overloaded"
                assert elapsed < 5


# ------------------------------------------------------------------------- rolling update


def test_rolling_update_under_load(tmp_path: Path, serve_port: int, exports: dict[str, str]) -> None:
    sha = {name: read_export_info(path)[0].weights_sha256 for name, path in exports.items()}
    with deployed(tmp_path, serve_port, exports["a"]) as url:
        results, served = _load_during_update(url, tmp_path, serve_port, exports["b"], sha["b"])
    failures = [r for r in results if r[0] != 200]
    assert not failures, failures[:3]
    assert served[0] == sha["a"] and served[-1] == sha["b"]


def _load_during_update(
    url: str, tmp_path: Path, port: int, new_export: str, new_sha: str
) -> tuple[list[tuple[int, str]], list[str]]:
    from pipeline.serve.deploy import deploy

    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                r = requests.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 8}, timeout=60)
                results.append((r.status_code, r.headers.get("x-raygpt-export-sha256", r.text)))
            except requests.RequestException as exc:  # a dropped connection is a failure too
                results.append((0, repr(exc)))
            time.sleep(0.05)

    threads = [threading.Thread(target=load) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        time.sleep(1)
        deploy(serve_config(tmp_path, port), new_export)  # returns once the new replicas are up
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not results or results[-1][1] != new_sha):
            time.sleep(0.2)
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return results, [s for _, s in results]


def test_serve_cli_detach_needs_a_cluster(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve", "--detach"]) == 2
    assert "--detach needs a running Ray cluster" in capsys.readouterr().err
    assert main(["serve", "--stop"]) == 2
    assert "--stop needs a running Ray cluster" in capsys.readouterr().err


# ------------------------------------------------------------------------- disconnects and timeouts


def test_disconnect_aborts_and_timeout_is_504(tmp_path: Path, serve_port: int, long_export: str) -> None:
    from ray import serve

    with deployed(tmp_path, serve_port, long_export, request_timeout_s=1.0) as url:
        stats = serve.get_deployment_handle("Generator", "raygpt").stats
        body = {"prompt": "Hi", "max_tokens": 2000, "stream": True}
        with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the generation is running; now the client goes away
        wait_idle(stats)
        start = time.monotonic()
        r = requests.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=30)
        assert expect_error(r, 504, "timeout")["type"] == "timeout" and time.monotonic() - start < 5
        with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=30) as r:
            events = sse_events(r)  # a stream past the limit ends with an error event, then [DONE]
        assert events[-1]["error"]["code"] == "timeout"
        wait_idle(stats)  # timed-out requests were cancelled on the replica too
