"""Joining or starting Ray, the one place every stage does it."""

from __future__ import annotations

import os

from pipeline.config import RunSection


def connect(run: RunSection) -> None:
    """Join ``run.ray_address`` (or $RAY_ADDRESS, as set by ``ray job submit``), else start a local Ray.

    A process that already initialized Ray (a test session, a job driver) keeps its connection.
    """
    import ray

    if ray.is_initialized():
        return
    address = run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local": always a new local Ray, never a cluster some other `ray start` left on this machine
        ray.init(address="local", num_cpus=run.num_cpus, include_dashboard=False, log_to_driver=True)
