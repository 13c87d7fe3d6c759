"""The shipped evaluation tasks hold held-out text only: every item comes from a document of the sample corpus's
validation split (the data stage's own split of the default config), and the builder reproduces the files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import REPO

from pipeline.config import PipelineConfig
from pipeline.data.documents import is_validation
from pipeline.eval.tasks import DATA_DIR, TASKS

sys.path.insert(0, str(REPO / "data" / "sample"))
from make_eval_tasks import held_out_documents  # noqa: E402


def _items(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_every_task_item_comes_from_a_validation_document() -> None:
    val_fraction = PipelineConfig().data.val_fraction
    held_out = {d["source"]: d["text"] for d in held_out_documents(PipelineConfig())}
    for name in TASKS:
        items = _items(name)
        assert len(items) >= 100, name
        for item in items:
            assert is_validation(item["source"], val_fraction), (name, item["source"])
            text = held_out[item["source"]]
            shown = item.get("context") or item.get("line") or item.get("text")
            assert shown and shown in text, (name, item["source"])
            if "target" in item:
                assert text.rstrip(".!?,;:").endswith(item["target"])


def test_the_builder_reproduces_the_shipped_files(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "data" / "sample" / "make_eval_tasks.py"), "--out", str(tmp_path)],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    for name in TASKS:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (DATA_DIR / f"{name}.jsonl").read_bytes(), name
