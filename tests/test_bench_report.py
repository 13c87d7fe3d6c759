"""bench/report.py: RESULTS.md is rendered from the benchmarks' saved fragments, with machine, date and ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import report


@pytest.fixture()
def bench_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(report, "FRAGMENTS", tmp_path / "results")
    monkeypatch.setattr(report, "RESULTS", tmp_path / "RESULTS.md")
    return tmp_path


def test_report_renders_every_fragment_with_machine_date_and_ratios(bench_dir: Path) -> None:
    report.save_fragment(
        "serve",
        "python -m bench.serve",
        "| system | tok/s |\n|---|---|\n| serve-1 | 600 |",
        [report.Headline("serve-1 vs hf-sequential, concurrency 8", "600 tok/s", "hf 100 tok/s", 6.0, 1.5)],
    )
    report.save_fragment(
        "tokenize",
        "python -m bench.tokenize --copies 11",
        "tokenize table",
        [report.Headline("end to end, 56 MB", "9 MB/s", "tiktoken 1 thread 9 MB/s", 1.04, 1.6)],
    )
    text = (bench_dir / "RESULTS.md").read_text()
    saved = json.loads((bench_dir / "results" / "serve.json").read_text())
    assert saved["machine"]["cores"] and saved["date"].endswith("UTC")
    # tokenize is rendered before serve whatever the order they ran in; every headline is in the summary
    assert text.index("## Tokenize") < text.index("## Serve")
    assert "| Serve: serve-1 vs hf-sequential, concurrency 8 | 600 tok/s | hf 100 tok/s | 6.00x | >= 1.5 (met) |" in (
        text
    )
    assert "| Tokenize: end to end, 56 MB | 9 MB/s | tiktoken 1 thread 9 MB/s | 1.04x | >= 1.6 (missed) |" in text
    assert f"Machine: {report.describe(saved['machine'])}." in text
    assert "`python -m bench.serve` on " + saved["date"] in text
    # re-running one benchmark replaces its fragment, never duplicates its section
    report.save_fragment("serve", "python -m bench.serve", "new table", [])
    text = (bench_dir / "RESULTS.md").read_text()
    assert text.count("## Serve") == 1 and "new table" in text and "600 tok/s" not in text
