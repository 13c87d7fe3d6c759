"""Streamed reading of input files: the same documents, counts and errors as reading each file whole, at any read
block size, in memory bounded by the block and the output chunk, not by the file.

Each memory case reads generated files of about 8 MB and 56 MB with the read stage's own function
(``file_documents``) in a child process and measures the child's peak RSS over each read. Reading a file whole costs
about twice its size or more; streamed, both reads peak at the same few tens of MB (block, chunk of rows, allocator
pools), so the difference between them stays far below the difference in size.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.data import DataError, clean, documents, finetune
from pipeline.data import tokenize as tokenize_module
from pipeline.data.tokenize import TokenizeDocuments

REPO = Path(__file__).resolve().parents[2]
SIZES = {"small": 50 << 10, "medium": 8 << 20, "large": 56 << 20}  # bytes of text, about
# the larger file may raise the peak by at most this share of its extra size (a whole-file read: 2 or more)
MAX_GROWTH = 0.25

CHILD = """
import json, re, sys
from pipeline.data.documents import file_documents

kind, mode, *uris = sys.argv[1:]

def peak():  # bytes: the kernel's high-water mark of this process's resident set since the last reset
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1)) * 1024

def read(uri):
    with open("/proc/self/clear_refs", "w") as reset:
        reset.write("5")  # VmHWM := current RSS, so earlier peaks (imports, the previous read) do not hide this one
    before = peak()
    documents = 0
    for table in file_documents(0, uri, "f", kind, text_field="text", txt_document=mode, bad_utf8="replace",
                                skip_binary=False, val_fraction=0.05):
        documents += table.column("kind").to_numpy().tolist().count(0)
    return {"documents": documents, "growth": peak() - before}

print(json.dumps([read(uri) for uri in uris]))
"""


def documents_of(count: int) -> list[str]:
    """``count`` distinct documents of about 1 KB (a few bodies of words, cycled: generating is fast)."""
    rng = np.random.default_rng(count)
    words = np.array("data stream block record line batch file memory bounded reader chunk row".split())
    bodies = [" ".join(words[rng.integers(0, len(words), 160)]) for _ in range(97)]
    return [f"document {i}: {bodies[i % len(bodies)]}" for i in range(count)]


def write_input(path: Path, kind: str, count: int) -> None:
    texts = documents_of(count)
    if kind == "jsonl":
        path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    elif kind == "txt":
        path.write_text("\n\n".join(texts) + "\n")
    else:
        table = pa.table({"id": np.arange(count), "text": texts})
        pq.write_table(table, path, row_group_size=2048, compression="none", use_dictionary=False)


def check_bounded(kind: str, files: dict[str, Path], uris: list[str]) -> None:
    """Read ``uris`` (the small, medium and large file) in a child; the large read may peak only a little higher
    than the medium one."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, kind, "paragraph", *uris], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _, medium, large = json.loads(done.stdout.strip().splitlines()[-1])
    assert [medium["documents"], large["documents"]] == [SIZES["medium"] // 1024, SIZES["large"] // 1024]
    extra = files["large"].stat().st_size - files["medium"].stat().st_size
    growth = large["growth"] - medium["growth"]
    mib = 1 << 20
    assert growth < MAX_GROWTH * extra, (
        f"peak RSS over a read: {medium['growth'] / mib:.1f} MiB for "
        f"{files['medium'].stat().st_size / mib:.1f} MiB of {kind}, {large['growth'] / mib:.1f} MiB for "
        f"{files['large'].stat().st_size / mib:.1f} MiB"
    )


def write_inputs(folder: Path, kind: str) -> dict[str, Path]:
    files = {name: folder / f"{name}.{kind}" for name in SIZES}
    for name, path in files.items():
        write_input(path, kind, SIZES[name] // 1024)
    return files


@pytest.mark.parametrize("kind", ["jsonl", "txt", "parquet"])
def test_one_large_local_file_is_read_in_bounded_memory(tmp_path: Path, kind: str) -> None:
    files = write_inputs(tmp_path, kind)
    check_bounded(kind, files, [str(files[name]) for name in SIZES])


def test_one_large_s3_object_is_read_in_bounded_memory(s3: str, tmp_path: Path) -> None:
    files = write_inputs(tmp_path, "jsonl")
    fs, root = storage.filesystem(f"{s3}/streaming")
    local = pafs.LocalFileSystem()
    for path in files.values():
        pafs.copy_files(str(path), f"{root}/{path.name}", source_filesystem=local, destination_filesystem=fs)
    check_bounded("jsonl", files, [f"{s3}/streaming/{path.name}" for path in files.values()])


# ------------------------------------------------------------------------------------------ same result as whole reads

# byte pieces that meet at block boundaries: CRLF, a BOM, multi-byte and truncated characters, an encoded U+FFFD,
# invalid bytes, NUL, whitespace that is not a paragraph break (form feed, no-break space)
PIECES = [b"a", b"b", b" ", b"\t", b"\n", b"\r", b"\r\n", "é".encode(), "😀".encode(), b"\xef\xbb\xbf", b"\xe9"]
PIECES += [b"\xf0\x9f", b"\xef\xbf\xbd", b"\x80", b"\x00", b"\x0c", "\u00a0".encode()]
JSONL_LINES = [b'{"text": "h\xc3\xa9llo"}', b'{"text": "caf\xe9"}', b'{"text": null}', b'{"body": 1}', b"[1]"]
JSONL_LINES += [b"{bad", b"", b"  ", b'{"text": "x\x00"}', b'{"text": 3}', b"\xef\xbb\xbf{}", b'{"text": "\xf0\x9f"}']
SEPARATORS = [b"\n", b"\r\n", b"\n\n"]
BLOCK_SIZES = (1, 2, 3, 5, 64)


def blocks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def whole_txt(data: bytes, mode: str, bad_utf8: str) -> tuple[Any, ...]:
    try:
        decoded = clean.decode(data, "f", bad_utf8)
    except DataError as exc:
        return ("error", str(exc))
    return (clean.split_text(decoded.text, mode), decoded.replaced)


def streamed_txt(data: bytes, mode: str, bad_utf8: str, size: int) -> tuple[Any, ...]:
    stream = clean.StreamDecoder(blocks(data, size), "f", bad_utf8)
    try:
        texts = list(clean.txt_documents(stream.texts(), mode))
    except DataError as exc:
        return ("error", str(exc))
    assert (stream.size, stream.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    return (texts, stream.replaced)


def whole_jsonl(data: bytes, bad_utf8: str) -> tuple[Any, ...]:
    try:
        decoded = clean.decode(data, "f", bad_utf8)
        return (list(clean.jsonl_texts(decoded.text, "f", "text")), decoded.replaced)
    except DataError as exc:
        return ("error", str(exc))


def streamed_jsonl(data: bytes, bad_utf8: str, size: int) -> tuple[Any, ...]:
    stream = clean.StreamDecoder(blocks(data, size), "f", bad_utf8)
    try:
        try:
            texts = list(clean.jsonl_line_texts(clean.split_lines(stream.texts()), "f", "text"))
        except clean.BinaryFileError:
            raise
        except DataError as exc:
            raise stream.outranking(exc) from None
    except DataError as exc:
        return ("error", str(exc))
    return (texts, stream.replaced)


def test_streamed_txt_documents_equal_those_of_the_whole_text() -> None:
    rng = random.Random(1)
    for _ in range(1500):
        parts = rng.choices(PIECES, k=rng.randint(0, 14))
        if rng.random() < 0.7:
            parts = [part for part in parts if part != b"\x00"]
        data = b"".join(parts)
        for mode in ("file", "paragraph", "line"):
            for bad_utf8 in ("replace", "fail"):
                want = whole_txt(data, mode, bad_utf8)
                for size in BLOCK_SIZES:
                    assert streamed_txt(data, mode, bad_utf8, size) == want, (data, mode, bad_utf8, size)


def test_streamed_jsonl_records_and_errors_equal_those_of_the_whole_text() -> None:
    # a NUL byte anywhere outranks invalid UTF-8 anywhere, which outranks a bad line, as for a whole-file decode
    rng = random.Random(2)
    for _ in range(1500):
        data = b"".join(rng.choice(JSONL_LINES) + rng.choice(SEPARATORS) for _ in range(rng.randint(0, 6)))
        if data and rng.random() < 0.5:
            data = data.rstrip(b"\r\n")
        for bad_utf8 in ("replace", "fail"):
            want = whole_jsonl(data, bad_utf8)
            for size in BLOCK_SIZES:
                assert streamed_jsonl(data, bad_utf8, size) == want, (data, bad_utf8, size)


def rows(tables: list[pa.Table]) -> list[dict[str, Any]]:
    return [row for table in tables for row in table.to_pylist()]


def read(path: Path, kind: str, **settings: Any) -> list[dict[str, Any]]:
    options = {"text_field": "text", "txt_document": "paragraph", "bad_utf8": "replace", "skip_binary": False}
    options.update(settings)
    return rows(list(documents.file_documents(3, str(path), path.name, kind, val_fraction=0.3, **options)))


def test_file_documents_do_not_depend_on_the_read_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = [f"\ufeffdocument {i}: caf\u00e9 \U0001f600\r\nsecond line\r" for i in range(40)]
    inputs = {
        "a.txt": ("txt", "\r\n\r\n  \n".join(texts).encode() + b" caf\xe9"),
        "a.jsonl": ("jsonl", "\r\n".join(json.dumps({"text": t}) for t in texts).encode() + b'\n{"text": "\xe9"}'),
    }
    for name, (_, data) in inputs.items():
        (tmp_path / name).write_bytes(data)
    table = pa.table({"text": texts * 3})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=7)
    inputs["a.parquet"] = ("parquet", (tmp_path / "a.parquet").read_bytes())
    cases = [(name, kind, {"txt_document": mode}) for name, (kind, _) in inputs.items() for mode in ("file", "line")]
    cases += [(name, kind, {}) for name, (kind, _) in inputs.items()]
    whole = [read(tmp_path / name, kind, **settings) for name, kind, settings in cases]
    monkeypatch.setattr(documents, "READ_BLOCK_BYTES", 3)
    monkeypatch.setattr(documents, "PARQUET_BUFFER_BYTES", 64)
    monkeypatch.setattr(documents, "CHUNK_CHARS", 100)  # many output tables, same rows
    assert [read(tmp_path / name, kind, **settings) for name, kind, settings in cases] == whole
    for (name, _, _), got in zip(cases, whole, strict=True):
        summary = json.loads(got[-1]["text"])
        assert summary["sha256"] == hashlib.sha256(inputs[name][1]).hexdigest()
        assert summary["bytes"] == len(inputs[name][1])
        assert summary["replaced_chars"] == (0 if name == "a.parquet" else 1)


def test_errors_name_file_and_line_whatever_the_read_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(documents, "READ_BLOCK_BYTES", 4)
    good = "".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(30))
    (tmp_path / "bad.jsonl").write_text(good + "{not json\n" + good)
    with pytest.raises(DataError, match=r"bad\.jsonl, line 31: not valid JSON"):
        read(tmp_path / "bad.jsonl", "jsonl")
    # a problem of the bytes further on outranks it, as when the file is decoded whole first
    (tmp_path / "late.jsonl").write_bytes(good.encode() + b"{not json\n" + good.encode() + b"caf\xe9\n")
    with pytest.raises(DataError, match=r"late\.jsonl: invalid UTF-8 at byte \d+ \(line 62\): b'\\xe9\\n'"):
        read(tmp_path / "late.jsonl", "jsonl", bad_utf8="fail")
    (tmp_path / "nul.jsonl").write_bytes(good.encode() + b"caf\xe9\n" + good.encode() + b"\x00")
    with pytest.raises(clean.BinaryFileError, match=r"nul\.jsonl: looks like a binary file \(NUL byte at offset"):
        read(tmp_path / "nul.jsonl", "jsonl", bad_utf8="fail")
    # skipped as binary: no document of it goes out, though the NUL byte comes after all of them
    summary = read(tmp_path / "nul.jsonl", "jsonl", skip_binary=True)
    assert len(summary) == 1 and summary[0]["kind"] == documents.KIND_FILE_SUMMARY
    info = json.loads(summary[0]["text"])
    assert info["skipped_binary"] and info["documents"] == 0
    assert info["sha256"] == hashlib.sha256((tmp_path / "nul.jsonl").read_bytes()).hexdigest()


def test_the_outranking_error_is_found_after_the_consumer_is_gone() -> None:
    data = b'{"text": "a"}\n{bad\n{"text": "caf\xe9"}\n'
    stream = clean.StreamDecoder(blocks(data, 3), "f", "fail")
    with pytest.raises(DataError, match="line 2: not valid JSON") as raised:
        list(clean.jsonl_line_texts(clean.split_lines(stream.texts()), "f", "text"))
    error = DataError(str(raised.value))
    del raised  # its traceback held the generators; now they are closed
    assert str(stream.outranking(error)).startswith("f: invalid UTF-8 at byte 32 (line 3)")


FINETUNE_LINES = [b'{"prompt": "Q\xc3\xa9", "completion": " A"}', b'{"prompt": "caf\xe9", "completion": "x"}']
FINETUNE_LINES += [b'{"prompt": "", "completion": "x"}', b'{"prompt": 1, "completion": "x"}', b"{bad", b"", b"\r"]
FINETUNE_LINES += [b'\xef\xbb\xbf{"prompt": "q", "completion": "a"}', b'{"prompt": "\x00", "completion": "a"}']


def test_finetune_examples_streamed_equal_those_of_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(finetune, "READ_BLOCK_BYTES", 2)
    rng = random.Random(3)
    path = tmp_path / "ft.jsonl"
    for _ in range(300):
        data = b"".join(rng.choice(FINETUNE_LINES) + rng.choice(SEPARATORS) for _ in range(rng.randint(0, 5)))
        path.write_bytes(data)
        for bad_utf8 in ("replace", "fail"):
            try:
                decoded = clean.decode(data, str(path), bad_utf8)
                text = decoded.text.replace("\r\n", "\n").replace("\r", "\n")
                want: Any = (finetune.parse_jsonl(text, str(path)), decoded.replaced, hashlib.sha256(data).hexdigest())
            except DataError as exc:
                want = str(exc)
            stats: dict[str, Any] = {}
            try:
                examples = list(finetune.read_examples(str(path), bad_utf8, stats))
                got: Any = (examples, stats["replaced_chars"], stats["sha256"])
                assert stats["examples"] == len(examples)
            except DataError as exc:
                got = str(exc)
            assert got == want, (data, bad_utf8)


def test_documents_added_a_list_at_a_time_give_the_chunks_of_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # a chunk ends with the document that reaches ROWS_PER_CHUNK rows or CHUNK_CHARS characters, and each
    # document's split is is_validation of its identity, however the documents were handed in
    monkeypatch.setattr(documents, "ROWS_PER_CHUNK", 7)
    monkeypatch.setattr(documents, "CHUNK_CHARS", 60)
    rng = random.Random(3)
    for normalized in (True, False):
        pool = ["", "  \n ", "\ufeff x ", " \ufeffy", "long " * 15, None]
        pool += [] if normalized else [" a\r\nb \r", "\r\r"]
        raws = [rng.choice([*pool, "word " * rng.randint(1, 5)]) for _ in range(500)]
        want: list[list[tuple[int, int, str]]] = [[]]
        for index, raw in enumerate(raws):
            text = clean.normalize(raw) if raw else ""
            if text:
                split = documents.VAL if documents.is_validation(f"f.txt#{index}", 0.3) else documents.TRAIN
                want[-1].append((index, split, text))
                if len(want[-1]) >= 7 or sum(len(t) for _, _, t in want[-1]) >= 60:
                    want.append([])
        chunker = documents._Chunker(0, "f.txt", 0.3)
        got = []
        position = 0
        while position < len(raws):
            size = rng.randint(1, 40)
            chunker.extend(raws[position : position + size], normalized=normalized)
            got += list(chunker.chunks())
            position += size
        got.append(chunker.take())
        columns = ("doc_index", "split", "text")
        assert [list(zip(*(t.column(c).to_pylist() for c in columns), strict=True)) for t in got] == want
        kept = sum(len(chunk) for chunk in want)
        assert (chunker.documents, chunker.skipped) == (kept, len(raws) - kept)


def test_a_block_encoded_in_slices_equals_it_encoded_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = [f"document {i}: " + "caf\u00e9 \U0001f600 " * (i % 7) for i in range(300)]
    texts[40] += " a literal <|endoftext|> stays text"
    tables = []  # the documents and summaries of three files in one block, as Ray Data coalesces them
    for file_index in range(3):
        chunker = documents._Chunker(file_index, f"f{file_index}", 0.3)
        for index, text in enumerate(texts):
            chunker.add(index, text)
        tables += [chunker.take(), chunker.summary({"sha256": "0", "bytes": 1})]
    batch = pa.concat_tables(tables)
    tokenize = TokenizeDocuments("r50k_base")
    whole = tokenize(batch)
    assert tokenize_module.text_slices(batch.column("text"), tokenize_module.ENCODE_BYTES) == [(0, len(batch))]
    monkeypatch.setattr(tokenize_module, "ENCODE_BYTES", 500)
    assert len(tokenize_module.text_slices(batch.column("text"), 500)) > 20
    assert tokenize(batch).equals(whole)
    assert whole.column("info").null_count == len(batch) - 3
