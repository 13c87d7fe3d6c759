"""Cleaning: bytes to text (a configured policy for bad UTF-8), newline normalization, documents out of a file.

A cleaned document is the decoded text with ``\\r\\n`` and ``\\r`` turned into ``\\n``, a leading byte-order mark
removed, and leading/trailing whitespace stripped. Documents that are empty after cleaning are skipped (and
counted by the caller).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.data.errors import DataError

_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")
_REPLACEMENT = "\ufffd"
_REPLACEMENT_BYTES = _REPLACEMENT.encode("utf-8")


class BinaryFileError(DataError):
    """The file holds NUL bytes: not text."""


@dataclass
class Decoded:
    text: str
    replaced: int  # replacement characters introduced for invalid bytes


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def decode(data: bytes, name: str, bad_utf8: str) -> Decoded:
    """UTF-8 bytes to text. ``bad_utf8='replace'`` substitutes U+FFFD and counts; ``'fail'`` names file and line.

    A file with a NUL byte is binary, not text: :class:`BinaryFileError` names it.
    """
    nul = data.find(b"\x00")
    if nul >= 0:
        raise BinaryFileError(
            f"{name}: looks like a binary file (NUL byte at offset {nul}, line {_line_of(data, nul)}), not text; "
            "remove it from data.inputs or set data.skip_binary=true"
        )
    try:
        return Decoded(data.decode("utf-8"), 0)
    except UnicodeDecodeError as exc:
        if bad_utf8 == "fail":
            raise DataError(
                f"{name}: invalid UTF-8 at byte {exc.start} (line {_line_of(data, exc.start)}): "
                f"{data[exc.start : exc.start + 4]!r}; fix the file or set data.bad_utf8=replace"
            ) from None
    text = data.decode("utf-8", errors="replace")
    return Decoded(text, text.count(_REPLACEMENT) - data.count(_REPLACEMENT_BYTES))


def normalize(text: str) -> str:
    """Newlines to ``\\n``, no byte-order mark, no leading/trailing whitespace."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").strip()


def split_text(text: str, mode: str) -> list[str]:
    """Raw (uncleaned) documents of a .txt file: the whole file, blocks separated by blank lines, or lines."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    if mode == "file":
        return [text]
    if mode == "paragraph":
        # blank lines separate documents; a file with no block at all counts as one empty document
        return [block for block in _PARAGRAPH_BREAK.split(text) if block.strip()] or [""]
    if mode == "line":
        lines = text.split("\n")
        return lines[:-1] if len(lines) > 1 and not lines[-1] else lines  # a final newline ends the last line
    raise ValueError(f"unknown txt document mode {mode!r}")


def jsonl_records(text: str, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line of a JSONL file; DataError naming the file and line for a line
    that is not a JSON object."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}, line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{name}, line {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def jsonl_texts(text: str, name: str, field: str) -> Iterator[tuple[int, str | None]]:
    """(line number, text or None for an empty document) per non-blank line of a JSONL file.

    Raises DataError naming the file and line for a line that is not a JSON object or lacks ``field``.
    """
    for number, record in jsonl_records(text, name):
        if field not in record:
            keys = ", ".join(sorted(record)) or "none"
            raise DataError(
                f"{name}, line {number}: no {field!r} field (fields: {keys}); set data.text_field to the right one"
            )
        value = record[field]
        if value is not None and not isinstance(value, str):
            raise DataError(f"{name}, line {number}: field {field!r} is a {type(value).__name__}, not a string")
        yield number, value
