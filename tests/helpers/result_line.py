"""A helper script hands its test one JSON result through its output. Ray's driver prints worker log lines into the
same stdout from another thread, between the writes of a `print`, so the result may share its line with log text
before or after it: the reader finds the marker anywhere and decodes exactly one JSON object from there."""

from __future__ import annotations

import json
from typing import Any

MARKER = "RESULT "


def print_result(result: dict[str, Any]) -> None:
    print(MARKER + json.dumps(result), flush=True)


def read_result(output: str) -> dict[str, Any] | None:
    """The last result in `output`, or None if it holds none."""
    start = output.rfind(MARKER + "{")
    if start < 0:
        return None
    result, _ = json.JSONDecoder().raw_decode(output, start + len(MARKER))
    return result
