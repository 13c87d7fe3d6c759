"""The console: training progress drawn by the driver from a real Ray actor, as lines off a terminal and as a bar
on one. (A whole run's console is checked on `ray job logs` in tests/integration/test_jobs.py.)"""

from __future__ import annotations

import io
import logging
import time

from pipeline.console import ProgressDisplay, format_progress


def _feed(display: ProgressDisplay, steps: list[int], pause: float) -> None:
    for step in steps:
        display.board.update.remote({"step": step, "loss": 10.0 - step / 10, "tokens_per_s": 1234.5})
        time.sleep(pause)


def test_off_a_terminal_progress_is_a_line_now_and_then_and_the_last_step(ray_session: None) -> None:
    stream = io.StringIO()
    with ProgressDisplay("pretrain", 10, every_s=0.2, stream=stream, tty=False) as display:
        _feed(display, [1, 4, 7, 10], pause=1.2)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 2 and all(line.startswith("pretrain step ") for line in lines), lines
    assert len(set(lines)) == len(lines)  # a step is printed once
    assert lines[-1].startswith("pretrain step 10/10 (100%)  loss 9.000  1,234 tok/s")
    assert "eta" in lines[-1] and "\r" not in stream.getvalue()


def test_a_quiet_stage_prints_only_its_last_step(ray_session: None) -> None:
    stream = io.StringIO()
    with ProgressDisplay("finetune", 3, every_s=3600, stream=stream, tty=False) as display:
        _feed(display, [1, 2, 3], pause=0.6)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("finetune step 3/3 (100%)  loss 9.700  1,234 tok/s"), lines


def test_on_a_terminal_progress_is_one_bar(ray_session: None) -> None:
    stream = io.StringIO()
    with ProgressDisplay("pretrain", 10, every_s=0.2, stream=stream, tty=True) as display:
        _feed(display, [2, 10], pause=1.2)
    drawn = stream.getvalue()
    assert "\r" in drawn and "pretrain step" not in drawn  # redrawn in place, not lines
    assert "10/10" in drawn and "loss 9.000, 1,234 tok/s" in drawn


def test_progress_line_format() -> None:
    progress = {"step": 50, "loss": 6.1234, "tokens_per_s": 1500.0}
    assert format_progress("pretrain", progress, 200, rate=0.5) == (
        "pretrain step 50/200 (25%)  loss 6.123  1,500 tok/s  eta 5m00s"
    )
    assert format_progress("pretrain", progress, 200, rate=None).endswith("1,500 tok/s")
    assert format_progress("pretrain", {**progress, "step": 0}, 100_000, rate=0.01).endswith("eta 2777h46m")


def test_ray_init_notice_of_token_auth_on_is_dropped_and_the_one_of_it_off_kept() -> None:
    from ray._private.authentication import authentication_token_setup as auth

    from pipeline.console import quiet_ray_init

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    quiet_ray_init()
    quiet_ray_init()  # idempotent: one filter
    kept = Keep()
    auth.logger.addHandler(kept)
    try:
        auth._warn_token_auth_enabled()
        auth._warn_token_auth_disabled()
    finally:
        auth.logger.removeHandler(kept)
    assert len(kept.messages) == 1 and kept.messages[0].startswith("Token authentication is disabled"), kept.messages
    assert sum(type(f).__name__ == "_DropNotice" for f in auth.logger.filters) == 1
