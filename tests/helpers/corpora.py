"""Corpora the data and training tests build on the fly."""

from __future__ import annotations

import json
from pathlib import Path

PLAY = Path(__file__).resolve().parents[2] / "data" / "sample" / "shakespeare" / "macbeth_gut.txt"


def two_sources(tmp_path: Path, books: float = 0.7, web: float = 0.3, *extra: str) -> list[str]:
    """A large source (a play, paragraphs) and a small one (10 JSONL records that all say 'web')."""
    (tmp_path / "books").mkdir(exist_ok=True)
    (tmp_path / "books" / PLAY.name).write_bytes(PLAY.read_bytes())
    (tmp_path / "web").mkdir(exist_ok=True)
    records = [json.dumps({"text": f"web page {i}: " + "web " * 30}) for i in range(10)]
    (tmp_path / "web" / "pages.jsonl").write_text("\n".join(records) + "\n")
    sources = [
        {"name": "books", "inputs": [str(tmp_path / "books")], "weight": books},
        {"name": "web", "inputs": [str(tmp_path / "web")], "weight": web},
    ]
    return [
        f"run.dir={tmp_path / 'run'}",
        f"data.sources={json.dumps(sources)}",
        "data.context_length=16",
        "data.num_tokenizers=1",
        *extra,
    ]
