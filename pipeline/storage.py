"""The one storage layer: local paths and URIs (s3://, gs://, file://) behind one small interface.

Every stage reads and writes artifacts through these functions: filesystems come from
:func:`pyarrow.fs.FileSystem.from_uri`, so a bucket is not a special case. A *URI* is anything with ``scheme://``; a
*remote* location is a URI that is not ``file://``. Directories are written to a staging directory and made visible
at once (:class:`Staged`): a reader finds either the previous version or the complete new one. Versioned formats
(a dataset manifest, an export's ``config.json``) are checked by :func:`format_problem`.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow.fs as pafs


class StorageError(OSError):
    """A location cannot be opened, listed or read; the message names it."""


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def is_remote(location: str | Path) -> bool:
    """A URI of an object store or another filesystem than this machine's (``file://`` is local)."""
    text = str(location)
    return is_uri(text) and not text.startswith("file://")


def local_path(location: str | Path) -> Path:
    """A local path for a plain path or a file:// URI (raises for remote URIs)."""
    text = str(location)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    if is_remote(text):
        raise ValueError(f"{text!r} is not on the local filesystem")
    return Path(text)


def absolute(location: str | Path) -> str:
    """``location`` with a local path made absolute (workers run in another directory than the driver)."""
    return str(location) if is_remote(location) else str(local_path(location).resolve())


def join(location: str | Path, *parts: str) -> str:
    text = str(location).rstrip("/")
    return "/".join([text, *parts]) if is_remote(text) else str(Path(text, *parts))


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path of a local path or URI."""
    text = str(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))
    try:
        return pafs.FileSystem.from_uri(text)
    except (pafs.ArrowInvalid, ValueError, OSError) as exc:  # type: ignore[attr-defined]
        raise StorageError(f"cannot open {text!r}: {exc}") from exc


def exists(location: str | Path) -> bool:
    if not is_remote(location):
        return local_path(location).exists()
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location: str | Path) -> bytes:
    """The whole content of one file (local path or URI); errors name the file."""
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except OSError as exc:
        raise StorageError(f"cannot read {str(location)!r}: {exc}") from exc


def open_input(location: str | Path) -> Any:
    """A seekable binary file object for one file (for parquet)."""
    fs, path = filesystem(location)
    try:
        return fs.open_input_file(path)
    except OSError as exc:
        raise StorageError(f"cannot read {str(location)!r}: {exc}") from exc


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def format_problem(document: Any, expected_format: str, expected_version: int) -> str | None:
    """Why a versioned JSON document is not one this raygpt reads, as the end of a sentence about it (``"has no
    format 'raygpt-export'"``, ``"has format version 2; this raygpt reads version 1"``), or None when it is."""
    if not isinstance(document, dict) or document.get("format") != expected_format:
        return f"has no format {expected_format!r}"
    if document.get("format_version") != expected_version:
        return f"has format version {document.get('format_version')!r}; this raygpt reads version {expected_version}"
    return None


def download_dir(location: str | Path, cache_root: str | Path | None = None) -> Path:
    """A local copy of a directory: the directory itself when local, else a fresh download of the URI."""
    if not is_remote(location):
        return local_path(location)
    root = Path(cache_root or tempfile.gettempdir()) / "raygpt-downloads"
    root.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(dir=root))
    pafs.copy_files(str(location), str(target))
    return target


class Staged:
    """``with Staged(location, last="manifest.json") as staging:`` write a directory's files into ``staging``; on a
    clean exit they are published at ``location`` (``published`` then holds where), on an error the staging
    directory is removed and nothing at ``location`` changes.

    Local targets are staged beside the target (same filesystem) and moved into place with one rename. Object
    stores have no atomic directory rename, so the file named ``last`` (the one readers look for first) is uploaded
    after everything else.
    """

    def __init__(self, location: str | Path, last: str | None = None) -> None:
        self.location = location
        self.last = last
        self.published = ""
        self._dir: Path | None = None

    def __enter__(self) -> Path:
        self._dir = staging_dir_for(self.location)
        return self._dir

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        assert self._dir is not None
        if kind is None:
            try:
                self.published = _publish_dir(self._dir, self.location, self.last)
                return
            except BaseException:
                shutil.rmtree(self._dir, ignore_errors=True)
                raise
        shutil.rmtree(self._dir, ignore_errors=True)


def _publish_dir(local_dir: Path, location: str | Path, last: str | None) -> str:
    if is_remote(location):
        fs, path = filesystem(location)
        fs.delete_dir_contents(path, missing_dir_ok=True)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == last)
        local_fs = pafs.LocalFileSystem()
        for file in files:
            destination = f"{path}/{file.relative_to(local_dir).as_posix()}"
            fs.create_dir(destination.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(file), destination, source_filesystem=local_fs, destination_filesystem=fs)
        shutil.rmtree(local_dir, ignore_errors=True)
        return str(location)
    target = local_path(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    trash = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        target.rename(trash)
    local_dir.rename(target)
    shutil.rmtree(trash, ignore_errors=True)
    return str(target)


def staging_dir_for(location: str | Path) -> Path:
    """An empty directory beside a local target (same filesystem, so the final rename is atomic).

    Its name records the process that owns it (``.<name>.tmp-<hex>-<pid>-<host>``): a build killed outright
    (SIGKILL, the OOM killer) runs no cleanup, so the next build for the same target removes what such builds
    left behind, and never the staging directory of a build still running (on this host or another one).
    """
    if is_remote(location):
        return Path(tempfile.mkdtemp(prefix="raygpt-stage-"))
    target = local_path(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}-{os.getpid()}-{socket.gethostname()}")
    staging.mkdir()
    return staging


def _remove_abandoned(target: Path) -> None:
    """Staging directories of ``target`` whose process (on this host) is gone, and trash a publish left."""
    prefix = f".{target.name}."
    for path in target.parent.glob(f"{glob.escape(prefix)}*"):
        kind, _, rest = path.name.removeprefix(prefix).partition("-")
        if kind == "old":  # a publish's renamed previous version: never read again
            shutil.rmtree(path, ignore_errors=True)
            continue
        _hex, _, owner = rest.partition("-")
        pid, _, host = owner.partition("-")
        if kind != "tmp" or not pid.isdigit() or host != socket.gethostname():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:  # alive, another user's
            pass


def write_text_atomic(path: Path, text: str) -> None:
    """Write a local file so that a reader sees the old content or the new, never a part (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
