"""Joining or starting Ray, the one place every stage does it."""

from __future__ import annotations

import os

from pipeline.config import RunSection
from pipeline.console import RAY_INIT_OPTIONS, quiet_ray, quiet_ray_init


def connect(run: RunSection) -> None:
    """Join ``run.ray_address`` (or $RAY_ADDRESS, as set by ``ray job submit``), else start a local Ray.

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
        # address="local": always a new local Ray, never a cluster some other `ray start` left on this machine
        ray.init(address="local", num_cpus=run.num_cpus, include_dashboard=False, **RAY_INIT_OPTIONS)
    quiet_ray()
