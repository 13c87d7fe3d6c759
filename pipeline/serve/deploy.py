"""Deploying the ``raygpt`` Serve application: the Ingress in front of ``serve.num_replicas`` (or autoscaled)
Generator replicas of one export, Serve's HTTP proxy on ``serve.host:serve.port``, and removing it again.

Backpressure: each Generator replica takes ``max_ongoing_requests`` requests at a time; up to
``max_queued_requests`` more wait in the ingress's handle queue; beyond that the ingress answers 503 at once.
Deploying again with another export rolls the Generator replicas over (new ones start before old ones stop, old
ones finish their requests), so clients see no failed requests. With ``serve.autoscaling`` the replica count follows
Serve's ongoing requests or the engines' queues (``serve.autoscaling.signal``, :func:`autoscaling_config`).
"""

from __future__ import annotations

import ipaddress
import json
import math
import time
from typing import Any

from ray import serve

from pipeline.config import API_KEY_ENV, ConfigError
from pipeline.layout import resolve_export
from pipeline.serve.app import Ingress
from pipeline.serve.autoscale import POLICY_PATH
from pipeline.serve.replica import Generator
from pipeline.serve.serving import ServingSettings

APP_NAME = "raygpt"


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds loopback only (``localhost`` or a 127/8 or ::1 address; names are not resolved)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(config: Any) -> None:
    """Refuse to serve with no API key where the endpoint is reachable beyond this machine (a non-loopback
    ``serve.host``, or ``serve.high_throughput``), unless ``serve.allow_unauthenticated``."""
    s = config.serve
    if s.resolved_api_key() is not None or s.allow_unauthenticated:
        return
    if s.high_throughput:
        raise ConfigError(
            "serve.high_throughput: each ingress replica also answers HTTP on a port of its own (30000-31000) on "
            f"every interface, whatever serve.host says; set ${API_KEY_ENV} (or serve.api_key), or "
            "serve.allow_unauthenticated: true if a firewall keeps those ports private"
        )
    if is_loopback(s.host):
        return
    raise ConfigError(
        f"serve.host: {s.host!r} would expose the endpoint beyond this machine with no API key; set "
        f"${API_KEY_ENV} (or serve.api_key), or serve.allow_unauthenticated: true if your own proxy or firewall "
        "authenticates callers"
    )


def autoscaling_config(s: Any) -> dict[str, Any]:
    """Ray Serve's ``autoscaling_config`` of the Generator deployment for ``serve.autoscaling`` (``s``: the serve
    section). Signal ``ongoing_requests`` is Serve's default policy over ``target_ongoing_requests``;
    ``engine_queue`` is :class:`~pipeline.serve.autoscale.EngineQueuePolicy` over ``target_sequences``
    (``serve.max_batch_size`` when empty). Serve applies the delays and min/max to either policy's decision."""
    a = s.autoscaling
    options: dict[str, Any] = {
        "min_replicas": a.min_replicas,
        "initial_replicas": max(1, a.min_replicas),
        "max_replicas": a.max_replicas,
        "target_ongoing_requests": a.target_ongoing_requests,
        "look_back_period_s": a.look_back_period_s,
        "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s,
    }
    if a.signal == "engine_queue":
        target = a.target_sequences if a.target_sequences is not None else s.max_batch_size
        options["policy"] = {"policy_function": POLICY_PATH, "policy_kwargs": {"target_sequences": float(target)}}
    return options


def build_app(config: Any, export: str | None = None) -> Any:
    """The Serve application for ``config.serve`` (export: ``export`` or ``resolve_export(config)``)."""
    from pipeline.export.format import read_export_info

    check_exposure(config)
    s = config.serve
    location = resolve_export(config, export)
    info, _ = read_export_info(location)  # a missing or broken export fails here, not in replica restarts
    options: dict[str, Any] = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "ray_actor_options": {"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica},
        "max_surge_percent": 100,  # rolling updates start replacements before stopping old replicas
        "graceful_shutdown_timeout_s": s.request_timeout_s + 5,
        "graceful_shutdown_wait_loop_s": 0.5,
        "max_constructor_retry_count": 3,
        # A dead replica is noticed by its failed health check: every 2 s rather than Serve's 10 s, so a killed
        # replica is replaced within seconds (tests/integration/test_faults.py measures it).
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 10.0,
    }
    if s.autoscaling is not None:
        options["autoscaling_config"] = autoscaling_config(s)
        options["num_replicas"] = "auto"
    else:
        options["num_replicas"] = s.num_replicas
    generator = Generator.options(**options).bind(
        location,
        max_batch_size=s.max_batch_size,
        batch_wait_timeout_s=s.batch_wait_timeout_s,
        num_threads=max(1, math.ceil(s.num_cpus_per_replica)),
        device="cuda" if s.num_gpus_per_replica > 0 else "cpu",
        tokenizer_file=config.data.tokenizer_file,
    )
    settings = ServingSettings(
        model_name=s.model_name,
        api_key=s.resolved_api_key(),
        request_timeout_s=s.request_timeout_s,
        max_request_bytes=s.max_request_bytes,
        context_length=info.model.context_length,
        vocab_size=info.model.vocab_size,
        tokenizer=info.tokenizer.get("name", "r50k_base"),
        tokenizer_file=config.data.tokenizer_file,
        metrics_public=s.metrics_public,
        replica_grpc=s.replica_grpc,
    )
    ingress = Ingress.options(
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10_000,
        max_surge_percent=100,
        graceful_shutdown_timeout_s=s.request_timeout_s + 5,
        graceful_shutdown_wait_loop_s=0.5,
        max_constructor_retry_count=3,
    ).bind(generator, settings)
    return ingress


def base_url(config: Any) -> str:
    host = config.serve.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.serve.port}"


def http_options(config: Any) -> dict[str, Any]:
    """Serve's HTTP proxy settings: ``serve.host`` (127.0.0.1 unless configured: Ray Serve's own default would be
    127.0.0.1 too, but it is never left implicit) and ``serve.port``."""
    return {
        "host": config.serve.host,
        "port": config.serve.port,
        "request_timeout_s": config.serve.request_timeout_s + 10,
    }


def deploy(config: Any, export: str | None = None) -> str:
    """Start (or update in place: a rolling update) the ``raygpt`` Serve application; returns the base URL.

    Joins ``run.ray_address`` or starts a local Ray, starts Serve's HTTP proxy on ``serve.host:serve.port``
    (fixed for the life of the Ray cluster's Serve instance), and waits until the replicas are up.
    """
    from pipeline.raycluster import connect

    app = build_app(config, resolve_export(config, export))
    connect(config.run, config.serve)
    check_binding(config)
    serve.start(http_options=http_options(config))
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return base_url(config)


def check_binding(config: Any) -> None:
    """Serve's HTTP proxy keeps the host and port it started with for the life of the cluster's Serve instance
    (``serve.start`` ignores new ones): refuse to deploy when they differ from ``serve.host``/``serve.port``,
    rather than announce a URL that does not answer."""
    from ray.serve.context import _get_global_client  # the one way to read a running instance's HTTP options

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return
    running = client.http_config
    if (running.host, running.port) != (config.serve.host, config.serve.port):
        raise ConfigError(
            f"Ray Serve already runs on this cluster with its HTTP proxy at {running.host}:{running.port}; it cannot "
            f"move to serve.host={config.serve.host!r}, serve.port={config.serve.port} while it runs. Set serve.host "
            "and serve.port to match, or stop that Serve instance first."
        )


def serve_forever(poll_s: float = 1.0) -> None:
    """Block until Ctrl-C, then delete the application (:func:`shutdown`)."""
    try:
        while True:
            time.sleep(poll_s)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()


def shutdown() -> None:
    """Delete the ``raygpt`` application, and only it: other applications on a shared cluster keep running. Serve
    itself stops once no application is left (the Ray cluster keeps running). Safe to call twice or when Serve is
    not running."""
    from ray.serve.exceptions import RayServeException

    try:
        serve.delete(APP_NAME)
        remaining = serve.status().applications
    except RayServeException:  # no Serve instance running
        return
    if not remaining:
        serve.shutdown()


def curl_example(config: Any, url: str | None = None) -> str:
    """A ready-to-paste curl command for the endpoint."""
    url = url or base_url(config)
    body = json.dumps({"model": config.serve.model_name, "prompt": "ROMEO:", "max_tokens": 32, "temperature": 0.8})
    auth = ""
    if config.serve.resolved_api_key():
        auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"'
    return f"curl -s {url}/v1/completions -H 'Content-Type: application/json'{auth} -d '{body}'"
