"""tests/helpers/result_line.py: a helper's result is read even when Ray's log lines share its output line."""

from helpers.result_line import read_result


def test_result_glued_to_log_text_on_both_sides_is_read() -> None:
    # As the driver printed it in CI: a worker's log line without its newline, then the result, then more log text.
    output = (
        "(_consolidate pid=17303) Parsing checkpoint created by deepspeed==0.19.8"
        'RESULT {"steps": 2, "nodes": ["a", "b"]}(_consolidate pid=17303) Detected checkpoint\n'
        "(_consolidate pid=17303) Reconstructed Trainable fp32 state dict\n"
    )
    assert read_result(output) == {"steps": 2, "nodes": ["a", "b"]}


def test_no_result_reads_as_none() -> None:
    assert read_result("RESULTS.md written\n") is None
