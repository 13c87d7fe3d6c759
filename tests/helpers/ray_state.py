"""Waiting on a condition, and the session Ray's actors from the GCS actor table (for fault-injection tests)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def live_actors(class_name: str | None = None, state: str | None = "ALIVE") -> list[dict[str, Any]]:
    """Actors of the session's Ray from the GCS actor table (ActorID, ActorClassName, JobID, State, Pid, ...).
    ``ray.util.state`` would need the dashboard, which the session's Ray runs without."""
    import ray._private.state

    return [
        actor
        for actor in ray._private.state.actors().values()
        if (class_name is None or actor["ActorClassName"] == class_name) and (state is None or actor["State"] == state)
    ]
