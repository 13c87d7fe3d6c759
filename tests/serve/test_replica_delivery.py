"""What the Generator's engine thread hands the event loop after each step: every delta of a streamed request; of a
request that does not stream, the first token's delta and then the rest merged when the sequence finishes."""

from __future__ import annotations

import asyncio

from pipeline.inference.outputs import Delta
from pipeline.serve.replica import Generator, _Attached


def test_a_request_that_does_not_stream_reaches_the_event_loop_at_its_first_token_and_at_its_end() -> None:
    generator = object.__new__(Generator.func_or_class)  # only the attached requests are read
    generator._attached = {1: _Attached(asyncio.Queue(), stream=False), 2: _Attached(asyncio.Queue(), stream=True)}
    steps = [
        [Delta(1, "a", [10], completion_tokens=1), Delta(2, "x", [20], completion_tokens=1)],
        [Delta(1, "b", [11], completion_tokens=2), Delta(2, "y", [21], completion_tokens=2)],
        [Delta(1, "c", [12], completion_tokens=3), Delta(3, "z", [30], completion_tokens=1)],
        [Delta(1, "d", [13], finish_reason="length", completion_tokens=4)],
    ]
    ready = [generator._ready(deltas) for deltas in steps]

    assert [[(i, d.text) for i, d in step] for step in ready] == [
        [(1, "a"), (2, "x")],  # the first token of 1 (the request's first-token notice); every delta of 2
        [(2, "y")],
        [(3, "z")],  # a sequence not (or no longer) attached: the event loop decides
        [(1, "bcd")],
    ]
    end = ready[3][0][1]
    assert (end.token_ids, end.finish_reason, end.completion_tokens) == ([11, 12, 13], "length", 4)
    assert generator._attached[1].pending is None
