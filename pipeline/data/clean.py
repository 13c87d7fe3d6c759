"""Cleaning: bytes to text (a configured policy for bad UTF-8), newline normalization, documents out of a file.

A cleaned document is the decoded text with ``\\r\\n`` and ``\\r`` turned into ``\\n``, a leading byte-order mark
removed, and leading/trailing whitespace stripped. Documents that are empty after cleaning are skipped (and
counted by the caller).

Two forms of each step: on a whole text (:func:`decode`, :func:`split_text`, :func:`jsonl_records`) and on a file
streamed in blocks (:class:`StreamDecoder`, :func:`txt_documents`, :func:`split_lines`,
:func:`jsonl_line_records`), which holds one block and the current document or line at a time. Both give the same
documents, counts and errors for the same bytes.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

from pipeline.data.errors import DataError

_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")
_REPLACEMENT = "\ufffd"
LINES_PER_BATCH = 4096  # txt_document=line: documents handed on a list at a time
_REPLACEMENT_BYTES = _REPLACEMENT.encode("utf-8")


class BinaryFileError(DataError):
    """The file holds NUL bytes: not text."""


@dataclass
class Decoded:
    text: str
    replaced: int  # replacement characters introduced for invalid bytes


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _binary_error(name: str, offset: int, line: int) -> BinaryFileError:
    return BinaryFileError(
        f"{name}: looks like a binary file (NUL byte at offset {offset}, line {line}), not text; "
        "remove it from data.inputs or set data.skip_binary=true"
    )


def _utf8_error(name: str, offset: int, line: int, shown: bytes) -> DataError:
    return DataError(
        f"{name}: invalid UTF-8 at byte {offset} (line {line}): {shown!r}; fix the file or set data.bad_utf8=replace"
    )


def decode(data: bytes, name: str, bad_utf8: str) -> Decoded:
    """UTF-8 bytes to text. ``bad_utf8='replace'`` substitutes U+FFFD and counts; ``'fail'`` names file and line.

    A file with a NUL byte is binary, not text: :class:`BinaryFileError` names it.
    """
    nul = data.find(b"\x00")
    if nul >= 0:
        raise _binary_error(name, nul, _line_of(data, nul))
    try:
        return Decoded(data.decode("utf-8"), 0)
    except UnicodeDecodeError as exc:
        if bad_utf8 == "fail":
            raise _utf8_error(name, exc.start, _line_of(data, exc.start), data[exc.start : exc.start + 4]) from None
    text = data.decode("utf-8", errors="replace")
    return Decoded(text, text.count(_REPLACEMENT) - data.count(_REPLACEMENT_BYTES))


class StreamDecoder:
    """Decodes a file given as consecutive byte blocks, the way :func:`decode` decodes it whole.

    :meth:`texts` yields the decoded text in pieces (a character never spans two pieces). ``size``, ``sha256``
    and ``replaced`` describe the bytes read so far, so the whole file once :meth:`texts` is exhausted. A NUL byte
    raises :class:`BinaryFileError` and, with ``bad_utf8='fail'``, invalid UTF-8 raises DataError, with the offset,
    line and shown bytes :func:`decode` reports.

    :func:`decode` looks at the whole file before any document exists, so a NUL byte anywhere outranks invalid
    UTF-8, which outranks an error in a document (a JSONL line). Streamed, a later block is not read yet when an
    earlier problem is found; :meth:`outranking` reads the rest of the file to pick the error :func:`decode` would
    have raised.
    """

    def __init__(self, blocks: Iterable[bytes], name: str, bad_utf8: str) -> None:
        self.name = name
        self.size = 0
        self.replaced = 0
        self._blocks = iter(blocks)
        self._strict = bad_utf8 == "fail"
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict" if self._strict else "replace")
        self._digest = hashlib.sha256()
        self._newlines = 0  # in the bytes before the current block
        self._tail = b""  # the last bytes of the previous block: a U+FFFD encoding may span two blocks
        self._stopped = False  # an error of its own ended the stream: nothing further is read

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def texts(self) -> Iterator[str]:
        try:
            for block in self._blocks:
                text = self._decode(block, final=False)
                if text:
                    yield text
            text = self._decode(b"", final=True)
        except Exception:  # not GeneratorExit: a consumer closing this generator leaves the rest readable
            self._stopped = True
            raise
        if text:
            yield text

    def skim(self) -> bool:
        """Read the rest of the file without decoding it (``size`` and ``sha256`` then cover it all): whether it
        holds a NUL byte."""
        found = False
        for block in self._blocks:
            self._count(block)
            found = found or b"\x00" in block
        return found

    def outranking(self, error: DataError) -> DataError:
        """The error :func:`decode` on the whole file would raise before ``error`` (raised by the consumer of
        :meth:`texts`), else ``error`` itself; reads the rest of the file to know."""
        if self._stopped:
            return error
        try:
            for _ in self.texts():
                pass
        except DataError as earlier:
            return earlier
        return error

    def _count(self, block: bytes) -> None:
        self._digest.update(block)
        self.size += len(block)
        self._newlines += block.count(b"\n")

    def _decode(self, block: bytes, final: bool) -> str:
        start, newlines = self.size, self._newlines
        nul = block.find(b"\x00")
        if nul >= 0:
            raise _binary_error(self.name, start + nul, newlines + block.count(b"\n", 0, nul) + 1)
        pending = self._decoder.getstate()[0]  # an incomplete character held from the previous block
        try:
            text = self._decoder.decode(block, final)
        except UnicodeDecodeError as exc:
            raise self._strict_error(exc, start - len(pending), newlines) from None
        self._count(block)
        if not self._strict:
            counted = self._tail + block
            self.replaced += text.count(_REPLACEMENT) - counted.count(_REPLACEMENT_BYTES)
            self._tail = counted[-(len(_REPLACEMENT_BYTES) - 1) :]
        return text

    def _strict_error(self, exc: UnicodeDecodeError, origin: int, newlines: int) -> DataError:
        """The invalid UTF-8 error for ``exc`` (whose data starts at file offset ``origin``), unless the rest of the
        file holds a NUL byte."""
        data = exc.object  # the held bytes of an incomplete character (never a newline), then the block
        line = newlines + data.count(b"\n", 0, exc.start) + 1
        shown = data[exc.start : exc.start + 4]
        offset, newlines = origin + len(data), newlines + data.count(b"\n")
        for block in self._blocks:
            if len(shown) < 4:
                shown += block[: 4 - len(shown)]
            nul = block.find(b"\x00")
            if nul >= 0:
                return _binary_error(self.name, offset + nul, newlines + block.count(b"\n", 0, nul) + 1)
            offset, newlines = offset + len(block), newlines + block.count(b"\n")
        return _utf8_error(self.name, origin + exc.start, line, shown)


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
    return jsonl_line_records(text.split("\n"), name)


def jsonl_texts(text: str, name: str, field: str) -> Iterator[tuple[int, str | None]]:
    """(line number, text or None for an empty document) per non-blank line of a JSONL file.

    Raises DataError naming the file and line for a line that is not a JSON object or lacks ``field``.
    """
    return jsonl_line_texts(text.split("\n"), name, field)


def jsonl_line_records(lines: Iterable[str], name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """:func:`jsonl_records` of a file given as its lines (``text.split("\\n")``, e.g. from :func:`split_lines`)."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}, line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{name}, line {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def jsonl_line_texts(lines: Iterable[str], name: str, field: str) -> Iterator[tuple[int, str | None]]:
    """:func:`jsonl_texts` of a file given as its lines."""
    for number, record in jsonl_line_records(lines, name):
        if field not in record:
            keys = ", ".join(sorted(record)) or "none"
            raise DataError(
                f"{name}, line {number}: no {field!r} field (fields: {keys}); set data.text_field to the right one"
            )
        value = record[field]
        if value is not None and not isinstance(value, str):
            raise DataError(f"{name}, line {number}: field {field!r} is a {type(value).__name__}, not a string")
        yield number, value


def split_lines(pieces: Iterable[str]) -> Iterator[str]:
    """The lines of a text given in pieces, exactly ``"".join(pieces).split("\\n")``, holding one line at a time."""
    partial: list[str] = []  # pieces of the line not ended yet
    for piece in pieces:
        if "\n" not in piece:
            partial.append(piece)
            continue
        lines = piece.split("\n")
        partial.append(lines[0])
        yield "".join(partial)
        yield from lines[1:-1]
        partial = [lines[-1]]
    yield "".join(partial)


def normalized(pieces: Iterable[str], keep_bom: bool = False) -> Iterator[str]:
    """A text given in pieces with a leading byte-order mark removed (unless ``keep_bom``) and ``\\r\\n`` and
    ``\\r`` turned into ``\\n``, as :func:`split_text` does to a whole text (a ``\\r`` ending a piece waits for the
    next one, which may start with ``\\n``)."""
    at_start, held = not keep_bom, ""
    for piece in pieces:
        piece = held + piece
        if at_start and piece:
            piece, at_start = piece.removeprefix("\ufeff"), False
        held = "\r" if piece.endswith("\r") else ""
        piece = piece.removesuffix(held)
        yield piece.replace("\r\n", "\n").replace("\r", "\n")
    if held:
        yield "\n"


def txt_documents(pieces: Iterable[str], mode: str) -> Iterator[str]:
    """:func:`split_text` of a text given in pieces, holding one document at a time (the whole text for
    ``mode='file'``)."""
    for batch in txt_document_batches(pieces, mode):
        yield from batch


def txt_document_batches(pieces: Iterable[str], mode: str) -> Iterator[list[str]]:
    """:func:`txt_documents` in lists (the documents each piece completes), so that a caller's work per document
    can be done a list at a time."""
    text = normalized(pieces)
    if mode == "file":
        yield ["".join(text)]
    elif mode == "paragraph":
        yield from _paragraphs(text)
    elif mode == "line":
        lines = _lines(split_lines(text))
        while batch := list(islice(lines, LINES_PER_BATCH)):
            yield batch
    else:
        raise ValueError(f"unknown txt document mode {mode!r}")


def _with_last(lines: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """(line, whether it is the last one) of a non-empty sequence."""
    iterator = iter(lines)
    previous = next(iterator)
    for line in iterator:
        yield previous, False
        previous = line
    yield previous, True


def _lines(lines: Iterable[str]) -> Iterator[str]:
    # every line; a final newline ends the last line instead of starting an empty one
    for number, (line, last) in enumerate(_with_last(lines)):
        if not last or number == 0 or line:
            yield line


def _paragraphs(pieces: Iterable[str]) -> Iterator[list[str]]:
    """``split_text(text, "paragraph")`` of a normalized text given in pieces, the blocks each piece completes.

    What is held is the current block and the whitespace after it. A break found before the held text's last
    character that is not a space, tab or newline is final: a break is only made of those, so more text cannot
    extend it, and the regular expression decides it without looking past that character. The text before the
    last such break is whole blocks, split as the regular expression splits the whole text (the held text before
    ``scan`` holds no break, so splitting from its start finds the same breaks).
    """
    held = ""
    kept = False
    for piece in pieces:
        scan = max(0, len(held.rstrip(" \t\n")))  # where a break may start: the held block itself has none
        held += piece
        end = len(held.rstrip(" \t\n"))
        last = None
        for last in _PARAGRAPH_BREAK.finditer(held, scan, end):  # noqa: B007 (only the last break is wanted)
            pass
        if last is None:
            continue
        blocks = [block for block in _PARAGRAPH_BREAK.split(held[: last.start()]) if block.strip()]
        held = held[last.end() :]
        if blocks:
            kept = True
            yield blocks
    blocks = [block for block in _PARAGRAPH_BREAK.split(held) if block.strip()]
    if blocks or not kept:
        yield blocks or [""]
