"""Generate raygpt's shipped evaluation tasks (pipeline/eval/data/*.jsonl) from the sample corpus's validation split.

Only documents the data stage holds out (``data.val_fraction`` of the default config, the same hash of each
document's identity) are used, so no task text was trained on. Each record keeps the identity of its document
(``source``: ``<file>#<document index>``) so that this can be checked (tests/eval/test_tasks.py does).

- ``raygpt_lambada``: LAMBADA-style last-word prediction on held-out speeches: the speech without its last word as
  context, the word as the continuation (accuracy = the greedy continuation is the word, and its perplexity).
- ``raygpt_speaker``: which of the play's four most frequent speakers says this held-out line (4-way multiple
  choice, scored by log-likelihood as GPT-3 scores its multiple-choice tasks).
- ``raygpt_ppl``: rolling perplexity of held-out speeches (word and byte perplexity, bits per byte).

Deterministic: re-running reproduces the files byte for byte.

    .venv/bin/python data/sample/make_eval_tasks.py [--out pipeline/eval/data]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.config import PipelineConfig
from pipeline.data.documents import KIND_DOCUMENT, VAL, file_documents
from pipeline.data.sources import discover

REPO = Path(__file__).resolve().parents[2]
HEADING = re.compile(r"^([A-Z][A-Za-z .'-]{1,30})\.$")  # a speech's first line names its speaker: "IAGO."
LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z']{3,})[.!?,;:]*$", re.S)
PER_TASK = 200


def held_out_documents(config: PipelineConfig) -> list[dict[str, Any]]:
    """The validation split's documents, exactly as the data stage reads and splits them."""
    data = config.data
    files, _ = discover([str(REPO / spec) for spec in data.inputs])
    documents = []
    for index, item in enumerate(files):
        for table in file_documents(
            index,
            item.uri,
            item.rel,
            item.kind,
            text_field=data.text_field,
            txt_document=data.txt_document,
            bad_utf8=data.bad_utf8,
            skip_binary=data.skip_binary,
            val_fraction=data.val_fraction,
        ):
            rows: pa.Table = table
            for row in rows.to_pylist():
                if row["kind"] == KIND_DOCUMENT and row["split"] == VAL:
                    documents.append({"source": f"{item.rel}#{row['doc_index']}", "text": row["text"]})
    return documents


def speech(document: dict[str, Any]) -> tuple[str, str] | None:
    """(speaker, spoken text) of a speech block, or None for stage directions and prose."""
    heading, _, body = document["text"].partition("\n")
    match = HEADING.match(heading.strip())
    if not match or not body.strip():
        return None
    return match.group(1).title(), body.strip()


def play_title(source: str) -> str:
    return source.split("#")[0].removesuffix(".txt").removesuffix("_gut").replace("_", " ").title()


def lambada(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    items = []
    for document in documents:
        parsed = speech(document)
        if parsed is None or not 25 <= len(parsed[1].split()) <= 80:
            continue
        match = LAST_WORD.match(parsed[1])
        if match:
            items.append({"source": document["source"], "context": match.group(1), "target": match.group(2)})
    return items[:PER_TASK]


def speaker(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_play: dict[str, list[tuple[str, str, str]]] = {}
    for document in documents:
        parsed = speech(document)
        if parsed is not None:
            by_play.setdefault(play_title(document["source"]), []).append((document["source"], *parsed))
    items = []
    for title in sorted(by_play):
        top = [name for name, _ in Counter(who for _, who, _ in by_play[title]).most_common(4)]
        if len(top) < 4:
            continue
        for source, who, body in by_play[title]:
            line = body.split("\n")[0].strip()
            if who in top and len(line.split()) >= 5:
                items.append({"source": source, "play": title, "line": line, "choices": top, "label": top.index(who)})
    step = max(1, len(items) // PER_TASK)  # spread over the plays, in a fixed order
    return items[::step][:PER_TASK]


def perplexity(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    items = [d for d in documents if len(d["text"].split()) >= 40]
    step = max(1, len(items) // 100)
    return [{"source": d["source"], "text": d["text"]} for d in items[::step][:100]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "pipeline" / "eval" / "data")
    args = parser.parse_args()
    documents = held_out_documents(PipelineConfig())
    args.out.mkdir(parents=True, exist_ok=True)
    for name, items in (
        ("raygpt_lambada", lambada(documents)),
        ("raygpt_speaker", speaker(documents)),
        ("raygpt_ppl", perplexity(documents)),
    ):
        text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        (args.out / f"{name}.jsonl").write_text(text, encoding="utf-8")
        print(f"{name}: {len(items)} items")


if __name__ == "__main__":
    main()
