"""Test helpers (not tests): HTTP helpers for the Serve tests, a Ray head started with ``ray start`` for the job
and autoscaling tests, and the scripts those tests run in subprocesses."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
