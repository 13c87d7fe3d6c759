"""Waiting on a condition, and the session Ray's actors from the GCS actor table (for fault-injection tests)."""

from __future__ import annotations

import threading
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


class PretrainThread:
    """``pretrain(config)`` on a thread of the test process, so the test can act on its workers mid-run: started,
    it waits for the two Ray Train workers it brings up. ``outcome`` gets ``summary`` or ``error``; ``before`` is
    every Ray Train worker that existed before it."""

    def __init__(self, config: Any, timeout: float = 180) -> None:
        from pipeline.train.driver import pretrain

        self.before = {a["ActorID"] for a in live_actors("RayTrainWorker", state=None)}
        self.outcome: dict[str, Any] = {}

        def train() -> None:
            try:
                self.outcome["summary"] = pretrain(config)
            except BaseException as exc:  # reported by the test thread
                self.outcome["error"] = exc

        self.thread = threading.Thread(target=train, name="pretrain", daemon=True)
        self.thread.start()
        self.workers: list[dict[str, Any]] = wait_until(
            lambda: (
                len(found := [a for a in live_actors("RayTrainWorker") if a["ActorID"] not in self.before]) == 2
                and found
            ),
            timeout,
            "2 training workers",
        )

    def started_since(self) -> dict[str, dict[str, Any]]:
        """Every Ray Train worker started since, by actor id, dead ones included."""
        return {a["ActorID"]: a for a in live_actors("RayTrainWorker", state=None) if a["ActorID"] not in self.before}
