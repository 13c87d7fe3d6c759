"""What a person sees: stage lines and one progress display per long stage, drawn by the driver; the rest goes to
Ray's log files.

Ray forwards every worker's output to the driver by default (Ray Train's controller and placement-group cleaner,
DeepSpeed, each rank's own prints) and Ray Data logs its plan and progress to the console. :func:`quiet_ray`
keeps those in Ray's session log directory (:func:`log_dir`, named in the run summary) and leaves warnings and
errors on the console. Training progress travels from rank 0 to the driver through a :class:`ProgressBoard`
actor; :class:`ProgressDisplay` draws it: a live bar (steps, loss, tokens/s, ETA) on a terminal, else a line every
``run.progress_every_s`` seconds (CI, ``ray job logs``).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, TextIO

RAY_INIT_OPTIONS = {"log_to_driver": False, "logging_level": logging.WARNING}
# Ray's notice that a local cluster has token authentication on: the secure default, nothing to act on. Its notice
# that authentication is off stays.
_AUTH_ON_NOTICE = "Token authentication is enabled"


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_ray_init() -> None:
    """Before ``ray.init``: drop the notices it logs that ask nothing of the user."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropNotice) for f in logger.filters):
        logger.addFilter(_DropNotice(_AUTH_ON_NOTICE))


def quiet_ray() -> None:
    """Ray Data's progress bars off and its console logging at WARNING (its log file keeps everything)."""
    from ray.data import DataContext
    from ray.util.debug import log_once

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    log_once("ray_data_progress_manager_disabled")  # Ray Data's notice that they are off: they are, on purpose
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":  # the console one; the session log keeps INFO
            handler.setLevel(logging.WARNING)


def log_dir() -> str:
    """Where this Ray session's logs are (every worker's output, Ray Data's and Ray Train's logs): on each node of
    a cluster, under the same path."""
    try:
        from ray._private.worker import _global_node

        return f"{_global_node.get_session_dir_path()}/logs"
    except Exception:  # not a local node (a Ray client), or Ray's internals moved
        return "/tmp/ray/session_latest/logs"


class ProgressBoard:
    """A Ray actor holding the latest progress of one training stage (rank 0 writes, the driver reads)."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] | None = None

    def update(self, progress: dict[str, Any]) -> None:
        self.latest = progress

    def read(self) -> dict[str, Any] | None:
        return self.latest


def format_progress(stage: str, progress: dict[str, Any], total: int, rate: float | None) -> str:
    """``pretrain step 12/200 (6%)  loss 6.123  1,234 tok/s  eta 3m10s`` (``rate``: steps per second so far)."""
    step = int(progress["step"])
    eta = (total - step) / rate if rate else None
    parts = [
        f"{stage} step {step}/{total} ({100 * step / max(total, 1):.0f}%)",
        f"loss {progress['loss']:.3f}",
        f"{progress['tokens_per_s']:,.0f} tok/s",
    ]
    if eta is not None:
        parts.append(f"eta {_duration(eta)}")
    return "  ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class ProgressDisplay:
    """Draws a :class:`ProgressBoard` while a stage runs: ``with ProgressDisplay(stage, total, every_s):``
    then pass :attr:`board` (an actor handle) to the workers. A terminal gets a tqdm bar; anything else a line
    every ``every_s`` seconds and one at the end."""

    POLL_S = 0.5

    def __init__(
        self, stage: str, total: int, every_s: float, stream: TextIO | None = None, tty: bool | None = None
    ) -> None:
        import ray

        self.stage, self.total, self.every_s = stage, total, every_s
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.board = ray.remote(num_cpus=0)(ProgressBoard).remote()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{stage}-progress", daemon=True)
        self._last: dict[str, Any] | None = None
        self._first: tuple[float, int] | None = None  # when the first step was seen, and which (the rate's base)

    def __enter__(self) -> ProgressDisplay:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()
        import ray

        ray.kill(self.board)

    def _read(self) -> dict[str, Any] | None:
        import ray

        try:
            return ray.get(self.board.read.remote(), timeout=10)
        except Exception:  # a busy or restarting cluster: try again at the next poll
            return None

    def _run(self) -> None:
        bar = None
        if self.tty:
            from tqdm import tqdm

            bar = tqdm(total=self.total, desc=self.stage, file=self.stream, dynamic_ncols=True)
        printed_at, printed = time.monotonic(), None
        while True:
            stopping = self._stop.wait(self.POLL_S)
            progress = self._read()
            if progress is not None and progress != self._last:
                self._last = progress
                if self._first is None:
                    self._first = (time.monotonic(), int(progress["step"]))
                if bar is not None:
                    bar.n = int(progress["step"])
                    bar.set_postfix_str(f"loss {progress['loss']:.3f}, {progress['tokens_per_s']:,.0f} tok/s")
            due = time.monotonic() - printed_at >= self.every_s or stopping
            if bar is None and self._last is not None and self._last != printed and due:
                line = format_progress(self.stage, self._last, self.total, self._rate())
                print(line, file=self.stream, flush=True)
                printed_at, printed = time.monotonic(), self._last
            if stopping:
                break
        if bar is not None:
            bar.close()

    def _rate(self) -> float | None:
        if self._first is None or self._last is None:
            return None
        seconds, steps = time.monotonic() - self._first[0], int(self._last["step"]) - self._first[1]
        return steps / seconds if steps > 0 and seconds > 0 else None
