"""Shared fixtures: one local Ray instance for every test that needs Ray (starting Ray costs seconds)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import exports, long_export, serve_port  # noqa: F401  (fixtures shared by the Serve tests)

REPO = Path(__file__).resolve().parents[1]

# Keep test runs quiet and offline-friendly.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A real local Ray shared by the whole session: 4 logical CPUs on this 2-core machine, so that two Serve
    replicas or two training workers fit beside Ray Data tasks."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()
