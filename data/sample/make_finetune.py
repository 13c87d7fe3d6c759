"""Generate the sample fine-tune set (train.jsonl, heldout.jsonl) from the Shakespeare sample corpus.

Task: "who speaks this?" Given a play's title and one or two lines of dialogue, name the speaker, who is one of the
two characters with the most lines in that play. The answer is scored by exact match of a greedy completion:

    {"prompt": "Play: Othello\\nLine: I will wear my heart upon my sleeve\\nSpeaker:", "completion": " Iago"}

Design (so that a 7M-parameter model fine-tuned for ~100 steps learns it): 12 labels, 2 per play, balanced within
each play and split; prompts of about 20-60 tokens; no line shared between train and held-out. Whole speeches go
to one split (a stable hash of play and speech number), so neighbouring lines of a speech never straddle the
splits. Deterministic: re-running reproduces the files byte for byte.

    .venv/bin/python data/sample/make_finetune.py [--out data/sample/finetune]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "shakespeare"
# play file -> (title, {speaker heading: normalized name}) for the two characters with the most speeches
PLAYS: dict[str, tuple[str, dict[str, str]]] = {
    "hamlet_gut.txt": ("Hamlet", {"Ham.": "Hamlet", "Hor.": "Horatio"}),
    "othello_gut.txt": ("Othello", {"OTHELLO.": "Othello", "IAGO.": "Iago"}),
    "julius_caesar_gut.txt": ("Julius Caesar", {"BRUTUS.": "Brutus", "CASSIUS.": "Cassius"}),
    "romeo_and_juliet_gut.txt": ("Romeo and Juliet", {"Romeo.": "Romeo", "Juliet.": "Juliet"}),
    "antony_and_cleopatra_gut.txt": ("Antony and Cleopatra", {"ANTONY.": "Antony", "CLEOPATRA.": "Cleopatra"}),
    "lear_gut.txt": ("King Lear", {"Lear.": "Lear", "Kent.": "Kent"}),
}
LINES_PER_EXAMPLE = 2
MIN_CHARS = 24  # shorter chunks ("Ay, my lord.") say nothing about the speaker
MAX_CHARS = 200
HELDOUT_FRACTION = 0.12
_DIRECTION = re.compile(r"\[[^\]]*\]")
_HEADING = re.compile(r"^[A-Z][A-Za-z' ]{0,30}\.$")


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def speeches(path: Path, speakers: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(speaker name, speech lines) of the chosen speakers, in play order."""
    lines = path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
    found: list[tuple[str, list[str]]] = []
    index = 0
    while index < len(lines):
        heading = lines[index].strip()
        starts = _HEADING.match(heading) and (index == 0 or not lines[index - 1].strip())
        if starts:
            body: list[str] = []
            index += 1
            while index < len(lines) and lines[index].strip():
                body.append(lines[index])
                index += 1
            if heading in speakers:
                cleaned = [" ".join(_DIRECTION.sub(" ", line).split()) for line in body]
                found.append((speakers[heading], [line for line in cleaned if line]))
        else:
            index += 1
    return found


def chunk(text_lines: list[str]) -> list[str]:
    chunks = []
    for start in range(0, len(text_lines), LINES_PER_EXAMPLE):
        text = " ".join(text_lines[start : start + LINES_PER_EXAMPLE])
        if len(text) > MAX_CHARS:
            text = text[:MAX_CHARS].rsplit(" ", 1)[0]
        if len(text) >= MIN_CHARS:
            chunks.append(text)
    return chunks


def build() -> dict[str, list[dict[str, str]]]:
    splits: dict[str, list[dict[str, str]]] = {"train": [], "heldout": []}
    seen: set[str] = set()
    for filename, (title, speakers) in PLAYS.items():
        per_split: dict[str, dict[str, list[str]]] = {
            split: {name: [] for name in speakers.values()} for split in splits
        }
        for number, (speaker, text_lines) in enumerate(speeches(CORPUS / filename, speakers)):
            split = "heldout" if _hash(f"{filename}#{number}") / 2**64 < HELDOUT_FRACTION else "train"
            for text in chunk(text_lines):
                key = " ".join(text.lower().split())
                if key in seen:  # a repeated line would be ambiguous or leak across splits
                    continue
                seen.add(key)
                per_split[split][speaker].append(text)
        for split, by_speaker in per_split.items():
            # balance: the same number of examples for both speakers of a play, chosen by a stable hash
            count = min(len(texts) for texts in by_speaker.values())
            for speaker, texts in by_speaker.items():
                chosen = sorted(texts, key=lambda t: _hash(f"{split}|{t}"))[:count]
                for text in chosen:
                    splits[split].append(
                        {"prompt": f"Play: {title}\nLine: {text}\nSpeaker:", "completion": f" {speaker}"}
                    )
    for split, examples in splits.items():
        examples.sort(key=lambda e: _hash(f"order|{split}|{e['prompt']}"))
    return splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", default=str(HERE / "finetune"), help="output folder")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, examples in build().items():
        text = "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in examples)
        (out / f"{split}.jsonl").write_text(text, encoding="utf-8", newline="\n")
        labels: dict[str, int] = {}
        for e in examples:
            labels[e["completion"].strip()] = labels.get(e["completion"].strip(), 0) + 1
        print(f"{split}: {len(examples)} examples; " + ", ".join(f"{k} {v}" for k, v in sorted(labels.items())))


if __name__ == "__main__":
    main()
