"""Finding and reading input files through pyarrow filesystems: local paths, globs, directories and URIs.

``s3://``, ``gs://`` and ``file://`` URIs go through :func:`pyarrow.fs.FileSystem.from_uri`, so a bucket is not
a special case. Every input file gets an *identity*: its path relative to the input it was found under (the
directory, the fixed part of a glob, or the file's own folder). Document identities derive from it, so the
train/val split of a document never depends on which other files are present.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.data.errors import DataError

KINDS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class InputFile:
    """One input file: where it is, what it holds, and its identity for document hashing."""

    uri: str  # a local absolute path or a URI (s3://bucket/key, file:///abs/path)
    rel: str  # path relative to the input root it was found under (posix separators)
    kind: str  # txt | jsonl | parquet
    size: int
    mtime_ns: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path of a local path or URI (DataError when unusable)."""
    try:
        return storage.filesystem(location)
    except storage.StorageError as exc:
        raise DataError(str(exc)) from exc


def _join_uri(base_uri: str, base_path: str, path: str) -> str:
    """Rebuild a URI for ``path`` (inside the filesystem of ``base_uri``, whose own path is ``base_path``)."""
    if not storage.is_uri(base_uri):
        return path
    prefix = base_uri[: len(base_uri) - len(base_uri.split("://", 1)[1])]  # scheme://
    if base_uri.startswith("file://"):
        return "file://" + path
    return prefix + path.lstrip("/")


def _kind(path: str) -> str | None:
    for suffix, kind in KINDS.items():
        if path.lower().endswith(suffix):
            return kind
    return None


def _file(fs_info: pafs.FileInfo, uri: str, rel: str) -> InputFile:
    kind = _kind(fs_info.path)
    assert kind is not None
    mtime = fs_info.mtime_ns if fs_info.mtime_ns is not None else None
    return InputFile(uri=uri, rel=rel, kind=kind, size=int(fs_info.size or 0), mtime_ns=mtime)


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _list_dir(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as exc:
        raise DataError(f"cannot list {root!r}: {exc}") from exc
    return [info for info in infos if info.type == pafs.FileType.File]


def _sort_entry(entry: pafs.FileInfo, rel: str, uri: str, found: list[InputFile], ignored: list[str]) -> None:
    """A listed file: an input when it has a known extension, ignored (and reported) otherwise; hidden files
    (a path part starting with ``.`` or ``_``) are skipped silently."""
    if _hidden(rel):
        return
    if _kind(rel) is None:
        ignored.append(uri)
    else:
        found.append(_file(entry, uri, rel))


def discover(inputs: Sequence[str]) -> tuple[list[InputFile], list[str]]:
    """Expand files, globs and directories into input files (in a stable order) and the ignored files' URIs.

    Directories are searched recursively for ``.txt``, ``.jsonl`` and ``.parquet`` files (hidden files and other
    extensions are ignored and reported); a glob must match at least one such file; an explicit file must have one
    of those extensions. Files are sorted by identity within each input; inputs keep their given order; a file
    named twice is read once.
    """
    if not inputs:
        raise DataError("no inputs configured (data.inputs is empty)")
    files: list[InputFile] = []
    ignored: list[str] = []
    seen: set[str] = set()
    for spec in inputs:
        fs, path = filesystem(spec)
        found: list[InputFile] = []
        scheme_part = spec.split("://", 1)[1] if storage.is_uri(spec) else path
        if any(char in scheme_part for char in _GLOB_CHARS):
            parts = path.split("/")
            fixed = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
            root = "/".join(parts[:fixed]) or "/"
            pattern = "/".join(parts[fixed:])
            info = fs.get_file_info(root)
            if info.type != pafs.FileType.Directory:
                raise DataError(f"input {spec!r}: folder {root!r} does not exist")
            for entry in _list_dir(fs, root):
                rel = entry.path[len(root) :].lstrip("/")
                if fnmatch.fnmatchcase(rel, pattern):
                    _sort_entry(entry, rel, _join_uri(spec, path, entry.path), found, ignored)
            if not found:
                raise DataError(f"input {spec!r} matches no .txt, .jsonl or .parquet file")
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise DataError(f"input {spec!r} does not exist")
            if info.type == pafs.FileType.Directory:
                for entry in _list_dir(fs, path):
                    rel = entry.path[len(path.rstrip("/")) :].lstrip("/")
                    _sort_entry(entry, rel, _join_uri(spec, path, entry.path), found, ignored)
                if not found:
                    raise DataError(f"input directory {spec!r} holds no .txt, .jsonl or .parquet file")
            else:
                if _kind(path) is None:
                    raise DataError(f"input {spec!r}: unsupported file type (use .txt, .jsonl or .parquet)")
                found.append(_file(info, spec if storage.is_uri(spec) else path, path.rsplit("/", 1)[-1]))
        for item in sorted(found, key=lambda f: f.rel):
            if item.uri not in seen:
                seen.add(item.uri)
                files.append(item)
    return files, sorted(ignored)


def read_bytes(uri: str) -> bytes:
    """The whole content of a file (local path or URI); errors name the file."""
    try:
        return storage.read_bytes(uri)
    except storage.StorageError as exc:
        raise DataError(str(exc)) from exc


def read_blocks(uri: str, block_size: int) -> Iterator[bytes]:
    """The content of a file (local path or URI) in consecutive blocks of at most ``block_size`` bytes; errors
    name the file."""
    try:
        yield from storage.read_blocks(uri, block_size)
    except storage.StorageError as exc:
        raise DataError(str(exc)) from exc


def open_input(uri: str) -> Any:
    """A seekable binary file object for ``uri`` (for parquet)."""
    try:
        return storage.open_input(uri)
    except storage.StorageError as exc:
        raise DataError(str(exc)) from exc
