"""``GET /metrics`` of the real Serve application: Prometheus text read back with prometheus_client's own parser.

The request, token and latency figures are compared with what the responses themselves report (``usage``, status
codes) as differences between two scrapes, so the tests do not depend on their order; the engine gauges are read
while a long stream runs and another request waits behind it (one batch slot), and again once both are done.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from helpers.serve import deployed, expect_error, sse_events
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from pipeline.inference.engine import Engine
from pipeline.inference.sampling import SamplingParams
from pipeline.model.gpt import GPT
from pipeline.model.presets import PRESETS
from pipeline.model.tokenizer import get_tokenizer

KEY = "sk-metrics-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 2048  # the long_export fixture's context length
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, headers: dict[str, str] | None = AUTH) -> Samples:
    r = requests.get(f"{url}/metrics", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == CONTENT_TYPE_LATEST
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def engine_gauges(samples: Samples) -> dict[str, dict[str, float]]:
    """replica -> {gauge name: value} for the engine gauges."""
    out: dict[str, dict[str, float]] = {}
    for (name, labels), v in samples.items():
        replica = dict(labels).get("replica")
        if replica is not None:
            out.setdefault(replica, {})[name] = v
    return out


# ---------------------------------------------------------------------------------------------- metrics_public


def test_metrics_public_opens_metrics_only(tmp_path: Path, serve_port: int, exports: dict[str, str]) -> None:
    # First in the file: it deploys its own application before the module's one exists (one app name).
    with deployed(tmp_path, serve_port, exports["a"], api_key=KEY, metrics_public=True) as url:
        samples = scrape(url, headers=None)
        assert ("raygpt_prompt_tokens_total", frozenset()) in samples
        expect_error(requests.get(f"{url}/v1/models", timeout=10), 401, "invalid_api_key")  # the rest keeps the key
        expect_error(requests.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=10), 401)


# ---------------------------------------------------------------------------------------------- one app, a key


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, serve_port: int, long_export: str) -> Iterator[str]:
    """One replica with one batch slot (a second sequence waits in the engine) and room for more requests, so a
    scrape finds a free Serve slot while two requests run."""
    run = tmp_path_factory.mktemp("metrics")
    with deployed(run, serve_port, long_export, api_key=KEY, max_batch_size=1, max_ongoing_requests=4) as base:
        yield base


def test_metrics_need_the_api_key(url: str) -> None:
    for headers in (None, {"Authorization": "Bearer wrong"}):
        r = requests.get(f"{url}/metrics", headers=headers, timeout=10)
        assert expect_error(r, 401, "invalid_api_key")["type"] == "authentication_error"
    assert "raygpt_requests_total" not in r.text
    assert ("raygpt_generation_tokens_total", frozenset()) in scrape(url)
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert "/metrics" not in spec["paths"]  # Prometheus text, not part of the JSON API


def test_request_token_and_latency_figures_match_the_responses(url: str) -> None:
    before = scrape(url)
    plain = requests.post(
        f"{url}/v1/completions",
        json={"prompt": "ROMEO:", "max_tokens": 5, "n": 2, "temperature": 0},
        headers=AUTH,
        timeout=60,
    )
    assert plain.status_code == 200, plain.text
    stream_body = {"prompt": "To be or not", "max_tokens": 7, "stream": True, "stream_options": {"include_usage": True}}
    with requests.post(f"{url}/v1/completions", json=stream_body, headers=AUTH, stream=True, timeout=60) as r:
        events = sse_events(r)
    chat_body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    chat = requests.post(f"{url}/v1/chat/completions", json=chat_body, headers=AUTH, timeout=60)
    assert chat.status_code == 200, chat.text
    bad = requests.post(f"{url}/v1/completions", json={"prompt": "x", "temperature": 5}, headers=AUTH, timeout=60)
    expect_error(bad, 400)
    expect_error(requests.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=60), 401)
    expect_error(requests.get(f"{url}/no/such/route", headers=AUTH, timeout=60), 404)
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    counted = {
        ("/v1/completions", "200"): 2,
        ("/v1/chat/completions", "200"): 1,
        ("/v1/completions", "400"): 1,
        ("/v1/completions", "401"): 1,
        ("unmatched", "404"): 1,
        ("/metrics", "200"): 1,  # the first scrape (a scrape is counted once it is answered)
    }
    for (route, status), n in counted.items():
        assert delta("raygpt_requests_total", route=route, status=status) == n, (route, status)
    usages = [plain.json()["usage"], events[-1]["usage"], chat.json()["usage"]]
    assert delta("raygpt_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    generated = sum(u["completion_tokens"] for u in usages)
    assert generated == 5 * 2 + 7 + 3 and delta("raygpt_generation_tokens_total") == generated
    sequences = 2 + 1 + 1  # each generated at least one token: all but its first token follow a gap
    assert delta("raygpt_time_to_first_token_seconds_count") == 3
    assert delta("raygpt_e2e_request_latency_seconds_count") == 3
    assert delta("raygpt_inter_token_latency_seconds_count") == generated - sequences
    ttft, e2e = delta("raygpt_time_to_first_token_seconds_sum"), delta("raygpt_e2e_request_latency_seconds_sum")
    assert 0 < ttft < e2e and delta("raygpt_inter_token_latency_seconds_sum") > 0
    # every observation falls in the +Inf bucket, and the buckets are cumulative
    assert delta("raygpt_e2e_request_latency_seconds_bucket", le="+Inf") == 3
    assert value(after, "raygpt_time_to_first_token_seconds_bucket", le="0.005") <= value(
        after, "raygpt_time_to_first_token_seconds_bucket", le="80.0"
    )


def test_a_plain_request_is_timed_from_its_first_token(url: str) -> None:
    """A non-streamed request reaches the ingress whole, yet its first token is timed when it is generated (the
    replica's notice) and its decode is spread over its inter-token gaps."""
    before = scrape(url)
    body = {"prompt": "Hi", "max_tokens": 400, "temperature": 0}
    r = requests.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 400, r.text
    after = scrape(url)

    def delta(name: str) -> float:
        return value(after, name) - value(before, name)

    ttft, e2e = delta("raygpt_time_to_first_token_seconds_sum"), delta("raygpt_e2e_request_latency_seconds_sum")
    decode = e2e - ttft
    assert 0 < ttft < decode, (ttft, e2e)  # 400 decode steps take longer than the prompt's one prefill
    assert delta("raygpt_inter_token_latency_seconds_count") == 399
    assert delta("raygpt_inter_token_latency_seconds_sum") == pytest.approx(decode, rel=0.25)


def test_engine_gauges_follow_the_replica(url: str) -> None:
    long_body = {"prompt": "Hi", "max_tokens": 2000, "stream": True}
    short: dict[str, Any] = {}

    def waiting_request() -> None:
        body = {"prompt": "ROMEO:", "max_tokens": 4, "temperature": 0}
        short["response"] = requests.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=120)

    with requests.post(f"{url}/v1/completions", json=long_body, headers=AUTH, stream=True, timeout=60) as r:
        assert r.status_code == 200
        replica = r.headers["x-raygpt-replica"]
        lines = r.iter_lines()
        next(lines)  # the long sequence is running
        waiter = threading.Thread(target=waiting_request)
        waiter.start()
        deadline = time.monotonic() + 20
        while True:
            samples = scrape(url)
            gauges = engine_gauges(samples)
            if gauges.get(replica, {}).get("raygpt_num_requests_waiting") == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert set(gauges) == {replica}, gauges  # one sample per gauge: the one replica
        first = gauges[replica]
        assert first["raygpt_num_requests_running"] == 1 and first["raygpt_num_requests_waiting"] == 1, first
        assert 0 < first["raygpt_kv_cache_tokens"] <= CONTEXT
        assert first["raygpt_kv_cache_usage_perc"] == pytest.approx(first["raygpt_kv_cache_tokens"] / CONTEXT)
        assert 0 <= first["raygpt_engine_stats_age_seconds"] < 1
        time.sleep(0.3)
        later = engine_gauges(scrape(url))[replica]
        assert later["raygpt_num_requests_running"] == 1 and later["raygpt_num_requests_waiting"] == 1, later
        assert later["raygpt_kv_cache_tokens"] > first["raygpt_kv_cache_tokens"]  # the long sequence grows
    # The client went away: the long sequence is aborted and the waiting request runs and finishes.
    waiter.join(timeout=60)
    assert short["response"].status_code == 200, short["response"].text
    deadline = time.monotonic() + 10
    idle = {"raygpt_num_requests_running": 0, "raygpt_num_requests_waiting": 0, "raygpt_kv_cache_tokens": 0}
    while True:
        gauges = engine_gauges(scrape(url))[replica]
        if {k: gauges[k] for k in idle} == idle or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert {k: gauges[k] for k in idle} == idle, gauges
    assert gauges["raygpt_kv_cache_usage_perc"] == 0


# ---------------------------------------------------------------------------------------------- in process


def test_engine_counts_the_positions_its_cache_holds() -> None:
    """Engine.num_cached_tokens (counted from the sequences) equals the real positions of the cache masks (the
    running batch's, and those of echoed prompts being scored) after every step, while sequences of different
    lengths join, decode and leave."""
    torch.manual_seed(0)
    nano = PRESETS["nano"].model
    engine = Engine(GPT(nano), get_tokenizer(), max_batch_size=3, prompt_logprobs_chunk=4)
    assert engine.num_cached_tokens == 0 and engine.cache_capacity == 3 * nano.context_length
    greedy = SamplingParams(temperature=0, stop_at_eot=False)
    for prompt, max_tokens in (([1, 2, 3], 6), ([4] * 9, 3), ([5, 6], 4)):
        engine.add(prompt, dataclasses.replace(greedy, max_tokens=max_tokens))
    engine.add(list(range(10, 30)), dataclasses.replace(greedy, max_tokens=2, echo=True, logprobs=1))  # scored
    steps, scored = 0, 0
    while engine.has_work():
        engine.step()
        steps += 1
        scored += bool(engine._scoring)
        held = 0 if engine._mask is None else int(engine._mask.sum())
        held += sum(int(job.mask.sum()) for job in engine._scoring)
        assert engine.num_cached_tokens == held, steps
    assert steps > 3 and scored > 0 and engine.num_cached_tokens == 0


def test_every_figure_also_goes_to_ray_metrics() -> None:
    from pipeline.serve.metrics import EngineGauges, ServingMetrics

    metrics = ServingMetrics()
    pairs = [metrics.requests, metrics.prompt_tokens, metrics.generation_tokens, metrics.ttft, metrics.itl]
    pairs += [metrics.e2e, metrics.engine_failures]
    for pair in pairs:
        assert pair.ray.info["name"] == pair.local._name  # Ray adds its ray_ prefix when it exports
    assert metrics.requests.ray.info["tag_keys"][-2:] == ("route", "status")
    gauges = EngineGauges()
    local = {family.name for family in metrics.engine.collect()}
    ray_names = {g.info["name"] for g in (gauges.running, gauges.waiting, gauges.kv, gauges.usage)}
    assert ray_names == local - {"raygpt_engine_stats_age_seconds"}
