"""Prometheus metrics of the serving application, named like vLLM's (``raygpt_`` for ``vllm:``).

Request, token and latency figures are measured in the ingress, where every request is seen: the counters and
histograms of :class:`ServingMetrics`, recorded by :class:`RequestCounter` (the HTTP status of every response) and
:class:`RequestTimer` (tokens as they reach the ingress). The engine's state lives in the Generator replicas: on
each scrape of ``GET /metrics`` the ingress asks every running replica for its :class:`EngineStats` (one
``broadcast`` call) and reports one gauge sample per replica (label ``replica``), so a scrape of one ingress shows
the whole application (the request figures are those of the ingress replica that answers the scrape; the app
runs one). A replica whose ``max_ongoing_requests`` slots are all taken answers once one frees; when
the replicas have not all answered within :data:`ENGINE_STATS_TIMEOUT_S`, the scrape shows the last figures each
replica gave, with their age in ``raygpt_engine_stats_age_seconds``.

The ingress keeps its figures in its own :class:`~prometheus_client.CollectorRegistry`, never the process-wide
default one, so apps built in one process do not share or collide. Every figure is also recorded through
``ray.serve.metrics`` (the ingress's counters and histograms in the ingress, the engine gauges in each Generator
every 0.5 s while its engine steps and when it goes idle), which Ray's metrics agent exports with the ``ray_``
prefix and Serve's deployment/replica/application tags.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from ray.serve import metrics as ray_metrics
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.inference.outputs import Delta

logger = logging.getLogger("ray.serve")
CONTENT_TYPE = CONTENT_TYPE_LATEST
ENGINE_STATS_TIMEOUT_S = 2.0  # well inside Prometheus's default 10 s scrape timeout
UNMATCHED_ROUTE = "unmatched"  # the route label of paths the app has no route for: clients cannot add label values

# Seconds. A nano model on a CPU decodes a token in about a millisecond, a large one on a loaded GPU in tenths of a
# second; prefill behind a full batch and queueing behind max_ongoing_requests add seconds. The last bounds reach
# past the largest serve.request_timeout_s in use.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class EngineStats:
    """One Generator replica's engine: sequences holding a batch slot and waiting for one, and the positions whose
    keys and values it holds (of ``kv_cache_capacity``: max_batch_size x context length)."""

    replica: str
    running: int
    waiting: int
    kv_cache_tokens: int
    kv_cache_capacity: int


class _Pair:
    """One figure in the ingress's registry and in Ray's metrics, recorded together."""

    def __init__(self, local: Any, ray: Any, record: Callable[[Any, float], None]) -> None:
        self.local, self.ray, self._record = local, ray, record

    def record(self, value: float, **labels: str) -> None:
        self._record(self.local.labels(**labels) if labels else self.local, value)
        if not isinstance(self.ray, ray_metrics.Counter):
            self.ray.observe(value, tags=labels)
        elif value > 0:  # Ray's counters refuse increments that are not positive
            self.ray.inc(value, tags=labels)


def _counter(registry: CollectorRegistry, name: str, doc: str, labels: Sequence[str] = ()) -> _Pair:
    local = Counter(name, doc, labelnames=labels, registry=registry)
    return _Pair(local, ray_metrics.Counter(name, doc, tag_keys=tuple(labels) or None), lambda m, v: m.inc(v))


def _histogram(registry: CollectorRegistry, name: str, doc: str, buckets: Sequence[float]) -> _Pair:
    local = Histogram(name, doc, buckets=buckets, registry=registry)
    return _Pair(local, ray_metrics.Histogram(name, doc, boundaries=list(buckets)), lambda m, v: m.observe(v))


class _EngineCollector:
    """The engine gauges, one sample per replica, from the last figures each replica reported."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[EngineStats, float]] = {}  # replica -> (figures, monotonic time received)

    def update(self, stats: Sequence[EngineStats]) -> None:
        now = time.monotonic()
        self.latest = {s.replica: (s, now) for s in stats}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {
            "running": GaugeMetricFamily(
                "raygpt_num_requests_running", "Sequences holding a batch slot in the engine.", labels=["replica"]
            ),
            "waiting": GaugeMetricFamily(
                "raygpt_num_requests_waiting", "Sequences waiting for a batch slot.", labels=["replica"]
            ),
            "kv": GaugeMetricFamily(
                "raygpt_kv_cache_tokens", "Positions whose keys and values the engine holds.", labels=["replica"]
            ),
            "usage": GaugeMetricFamily(
                "raygpt_kv_cache_usage_perc",
                "KV-cache positions in use, a fraction of max_batch_size x context length.",
                labels=["replica"],
            ),
            "age": GaugeMetricFamily(
                "raygpt_engine_stats_age_seconds", "How old the engine figures of this scrape are.", labels=["replica"]
            ),
        }
        now = time.monotonic()
        for replica, (s, received) in sorted(self.latest.items()):
            families["running"].add_metric([replica], s.running)
            families["waiting"].add_metric([replica], s.waiting)
            families["kv"].add_metric([replica], s.kv_cache_tokens)
            families["usage"].add_metric([replica], s.kv_cache_tokens / max(1, s.kv_cache_capacity))
            families["age"].add_metric([replica], now - received)
        yield from families.values()


class ServingMetrics:
    """The ingress's metrics: request counts by route and status, token counters, latency histograms, and the
    Generator replicas' engine gauges gathered on each scrape (:meth:`scrape`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = _counter(
            r, "raygpt_requests", "HTTP requests answered, by route and status code.", ("route", "status")
        )
        self.prompt_tokens = _counter(r, "raygpt_prompt_tokens", "Prompt tokens of requests a replica accepted.")
        self.generation_tokens = _counter(r, "raygpt_generation_tokens", "Tokens generated, as they reach the ingress.")
        self.ttft = _histogram(
            r,
            "raygpt_time_to_first_token_seconds",
            "From a generation request's arrival to its first generated token.",
            TTFT_BUCKETS,
        )
        self.itl = _histogram(
            r, "raygpt_inter_token_latency_seconds", "Between successive tokens of a sequence.", ITL_BUCKETS
        )
        self.e2e = _histogram(
            r,
            "raygpt_e2e_request_latency_seconds",
            "From a generation request's arrival to its last token, for requests that completed.",
            E2E_BUCKETS,
        )
        self.engine = _EngineCollector()
        r.register(self.engine)
        self.engine_failures = _counter(
            r,
            "raygpt_engine_stats_failures",
            "Scrapes in which a Generator replica did not give its engine figures (it timed out or failed).",
        )

    def timer(self) -> RequestTimer:
        return RequestTimer(self)

    async def scrape(self, generator: Any) -> bytes:
        """The exposition text, after asking every running Generator replica behind ``generator`` (a deployment
        handle) for its engine figures."""
        from ray.serve.exceptions import DeploymentUnavailableError

        try:
            results = await generator.broadcast("engine_stats").results_async(
                timeout_s=ENGINE_STATS_TIMEOUT_S, return_exceptions=True
            )
        except DeploymentUnavailableError:  # no replica is running: no engine to report
            self.engine.update([])
        except Exception as exc:  # timed out: the last figures stay, with their age; the ingress's own still answer
            logger.warning("engine figures for /metrics unavailable: %s", type(exc).__name__)
            self.engine_failures.record(1)
        else:
            stats = [s for s in results if isinstance(s, EngineStats)]
            if len(stats) < len(results):  # a replica that died or failed: reported no more
                self.engine_failures.record(1)
            self.engine.update(stats)
        return generate_latest(self.registry)


class RequestTimer:
    """Token timing of one generation request, fed each delta as it reaches the ingress (:meth:`seen`) and, for
    non-streamed requests, the replica's first-token notice (:meth:`first_token`).

    A delta that carries k new tokens of a sequence counts k inter-token gaps of (now - that sequence's previous
    token) / k; a sequence's first delta counts k - 1 gaps from its first token. A non-streamed request reaches the
    ingress as a first-token notice and then one merged delta per sequence, so each of its gaps is the mean over
    its decode: the histogram's count is exact, its sum is each sequence's span from the request's first token to
    its end, and its buckets are smoothed.
    """

    def __init__(self, metrics: ServingMetrics) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.first: float | None = None  # when the request's first token arrived
        self.tokens: dict[int, tuple[int, float]] = {}  # sequence index -> (tokens so far, when the last came)

    def accepted(self, prompt_tokens: int) -> None:
        self.metrics.prompt_tokens.record(prompt_tokens)

    def first_token(self) -> None:
        if self.first is None:
            self.first = time.monotonic()
            self.metrics.ttft.record(self.first - self.start)

    def seen(self, index: int, delta: Delta) -> None:
        count, last = self.tokens.get(index, (0, None))
        new = delta.completion_tokens - count
        if new <= 0:
            return
        self.first_token()
        assert self.first is not None
        now = time.monotonic()
        self.metrics.generation_tokens.record(new)
        gaps = new if last is not None else new - 1
        if gaps > 0:
            gap = (now - (last if last is not None else self.first)) / gaps
            for _ in range(gaps):
                self.metrics.itl.record(gap)
        self.tokens[index] = (delta.completion_tokens, now)

    def completed(self) -> None:
        self.metrics.e2e.record(time.monotonic() - self.start)


class RequestCounter:
    """ASGI middleware: counts every response by route and status once it is sent (a stream when it ends)."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception before any response is sent reaches the client as a 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            route = path if path in self.routes else UNMATCHED_ROUTE
            self.metrics.requests.record(1, route=route, status=str(status))


class EngineGauges:
    """A Generator replica's engine figures as ``ray.serve.metrics`` gauges (Serve adds the replica's tags)."""

    def __init__(self) -> None:
        self.running = ray_metrics.Gauge("raygpt_num_requests_running", "Sequences holding a batch slot.")
        self.waiting = ray_metrics.Gauge("raygpt_num_requests_waiting", "Sequences waiting for a batch slot.")
        self.kv = ray_metrics.Gauge("raygpt_kv_cache_tokens", "Positions whose keys and values the engine holds.")
        self.usage = ray_metrics.Gauge("raygpt_kv_cache_usage_perc", "KV-cache positions in use, a fraction.")

    def record(self, stats: EngineStats) -> None:
        self.running.set(stats.running, tags={})
        self.waiting.set(stats.waiting, tags={})
        self.kv.set(stats.kv_cache_tokens, tags={})
        self.usage.set(stats.kv_cache_tokens / max(1, stats.kv_cache_capacity), tags={})
