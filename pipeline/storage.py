"""The one storage layer: local paths and URIs (s3://, gs://, file://) behind one small interface.

Every stage reads and writes artifacts through these functions: filesystems come from
:func:`pyarrow.fs.FileSystem.from_uri`, so a bucket is not a special case. A *URI* is anything with ``scheme://``; a
*remote* location is a URI that is not ``file://``. Versioned formats (a dataset manifest, an export's
``config.json``) are checked by :func:`format_problem`.

Publishing a directory (:class:`Staged`) never shows a reader a partial version and never loses the previous one:

* on a local filesystem the new version is written beside the target and renamed into place;
* on an object store (no atomic rename) it is uploaded under ``<location>/_versions/<version>/`` and becomes
  visible when the small pointer object ``<location>/_PUBLISHED`` naming it is written, last. A reader resolves the
  pointer first (:func:`resolve`), so until then it keeps reading the previous version; versions other than the
  new and the previous one (and uploads that never completed) are deleted afterwards.

Single files (state, metrics, summaries) are written whole (:func:`write_bytes`): a temp file renamed into place
locally, one PUT on an object store. Remote directories that must be local are copied to temporary directories
that are removed after use (:func:`local_copy`); export weights go to a cache keyed by their sha256 and bounded in
size (:func:`cached_file`).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow.fs as pafs

POINTER = "_PUBLISHED"  # in a published remote directory: names the visible version
VERSIONS = "_versions"  # in a published remote directory: one prefix per version
CACHE_DIR_ENV = "RAYGPT_CACHE_DIR"
CACHE_BYTES_ENV = "RAYGPT_CACHE_MAX_BYTES"
DEFAULT_CACHE_BYTES = 20 << 30


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
    return "/".join([text, *parts]) if is_uri(text) else str(Path(text, *parts))


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


def is_empty(location: str | Path) -> bool:
    """Nothing at ``location``, or an empty directory (prefix)."""
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return True
    if info.type != pafs.FileType.Directory:
        return False
    return not fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))


def read_bytes(location: str | Path) -> bytes:
    """The whole content of one file (local path or URI); errors name the file."""
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except OSError as exc:
        raise StorageError(f"cannot read {str(location)!r}: {exc}") from exc


def read_blocks(location: str | Path, block_size: int = 1 << 20) -> Iterator[bytes]:
    """The content of one file (local path or URI) as consecutive blocks of at most ``block_size`` bytes, read
    from one sequential stream, so a file of any size takes one block of memory; errors name the file."""
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as stream:
            while block := stream.read(block_size):
                yield block
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


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write one whole file: readers see the old content or the new, never a part."""
    if not is_remote(location):
        path = local_path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        tmp.write_bytes(data)
        tmp.replace(path)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as stream:  # an object store makes a PUT visible whole
        stream.write(data)


def remove_tree(location: str | Path) -> None:
    """Delete a directory (or prefix) and everything under it; nothing there is fine."""
    if not is_remote(location):
        shutil.rmtree(local_path(location), ignore_errors=True)
        return
    fs, path = filesystem(location)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(path)


def uri_in(like: str | Path, path: str) -> str:
    """The location of ``path`` (a path inside the filesystem of ``like``, as pyarrow and Ray report it, e.g.
    ``bucket/key`` for S3) written so that this module opens it."""
    text = str(like)
    if not is_remote(text):
        return path
    return f"{text.split('://', 1)[0]}://{path.lstrip('/')}"


def resolve(location: str | Path) -> str:
    """Where the visible version of a published directory is: ``location`` itself locally (or for a remote
    directory that was never published with a pointer), else the version its pointer names."""
    text = str(location)
    if not is_remote(text):
        return text
    fs, path = filesystem(text)
    try:
        with fs.open_input_stream(f"{path.rstrip('/')}/{POINTER}") as stream:
            version = json.loads(stream.read())["version"]
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return text
    return join(text, VERSIONS, version)


@contextlib.contextmanager
def local_copy(location: str | Path) -> Iterator[Path]:
    """A local directory with the content of ``location``: the directory itself when local, else a temporary
    download that is removed when the block ends."""
    if not is_remote(location):
        yield local_path(location)
        return
    target = Path(tempfile.mkdtemp(prefix="raygpt-copy-"))
    try:
        fs, path = filesystem(location)
        pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield target
    finally:
        shutil.rmtree(target, ignore_errors=True)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "raygpt")


def cached_file(location: str | Path, sha256: str) -> Path:
    """A local copy of one remote file whose content has the given sha256, from the cache when present.

    Entries are named by content, so a republished export with new weights never meets stale ones, and a
    download is verified before it enters the cache. The cache is bounded: least recently used entries go once
    it holds more than ``$RAYGPT_CACHE_MAX_BYTES`` (default 20 GiB).
    """
    root = cache_root() / "sha256"
    entry = root / sha256
    if entry.is_file():
        os.utime(entry)  # recently used
        return entry
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".{sha256}.part-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        fs, path = filesystem(location)
        pafs.copy_files(path, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        if file_sha256(partial) != sha256:
            raise StorageError(f"{str(location)!r} does not match its sha256 {sha256}")
        partial.replace(entry)
    finally:
        partial.unlink(missing_ok=True)
    _trim_cache(root, keep=entry)
    return entry


def _trim_cache(root: Path, keep: Path) -> None:
    limit = int(os.environ.get(CACHE_BYTES_ENV) or DEFAULT_CACHE_BYTES)
    entries = sorted((p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")), key=_mtime)
    total = sum(p.stat().st_size for p in entries)
    for entry in entries:
        if total <= limit:
            break
        if entry != keep:
            total -= entry.stat().st_size
            entry.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


class Staged:
    """``with Staged(location, last="manifest.json") as staging:`` write a directory's files into ``staging``; on a
    clean exit they are published at ``location`` (``published`` then holds where), on an error the staging
    directory is removed and nothing at ``location`` changes.

    Local targets are staged beside the target (same filesystem) and moved into place with one rename. Object
    stores have no atomic directory rename: the new version's prefix is chosen on entry, and the file named
    ``last`` (the one readers look for first) is uploaded after everything else.

    ``shared`` is where tasks may write files of the directory themselves, so that its content never passes
    through this process: the staging directory for a local target (the same machine, or a disk every node
    mounts), the new version's prefix for a remote one. Files there are published with those in ``staging``.
    """

    def __init__(self, location: str | Path, last: str | None = None) -> None:
        self.location = location
        self.last = last
        self.published = ""
        self.shared = ""
        self._dir: Path | None = None
        self._version = ""

    def __enter__(self) -> Path:
        self._dir = staging_dir_for(self.location)
        if is_remote(self.location):
            self._version = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
            self.shared = join(self.location, VERSIONS, self._version)
        else:
            self.shared = str(self._dir)
        return self._dir

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        assert self._dir is not None
        if kind is None:
            try:
                self.published = _publish_dir(self._dir, self.location, self.last, self._version)
                return
            except BaseException:
                shutil.rmtree(self._dir, ignore_errors=True)
                raise
        shutil.rmtree(self._dir, ignore_errors=True)
        if self._version:  # what tasks wrote; a version no pointer names is swept by the next publish anyway
            with contextlib.suppress(Exception):
                remove_tree(self.shared)


def _publish_dir(local_dir: Path, location: str | Path, last: str | None, version: str = "") -> str:
    if is_remote(location):
        _publish_remote(local_dir, str(location), last, version)
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


def _publish_remote(local_dir: Path, location: str, last: str | None, version: str = "") -> None:
    """Upload as a new version (``version``: a prefix tasks may already hold files in), point readers at it, then
    delete every version but it and the previous one."""
    fs, root = filesystem(location)
    root = root.rstrip("/")
    previous = resolve(location)
    version = version or f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    prefix = f"{root}/{VERSIONS}/{version}"
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)
    local_fs = pafs.LocalFileSystem()
    try:
        for file in files:
            pafs.copy_files(
                str(file),
                f"{prefix}/{file.relative_to(local_dir).as_posix()}",
                source_filesystem=local_fs,
                destination_filesystem=fs,
            )
        listing = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
        count = sum(1 for entry in listing if entry.type == pafs.FileType.File)
        pointer = json.dumps({"version": version, "files": count}).encode()
        with fs.open_output_stream(f"{root}/{POINTER}") as stream:
            stream.write(pointer)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.delete_dir(prefix)
        raise
    keep = {version, previous.rstrip("/").rsplit("/", 1)[-1]}
    for entry in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        name = entry.base_name
        if name in (POINTER, VERSIONS):
            continue
        with contextlib.suppress(OSError):  # content of an unversioned publish: superseded by the pointer
            if entry.type == pafs.FileType.Directory:
                fs.delete_dir(entry.path)
            else:
                fs.delete_file(entry.path)
    for entry in fs.get_file_info(pafs.FileSelector(f"{root}/{VERSIONS}", allow_not_found=True)):
        if entry.base_name not in keep:
            with contextlib.suppress(OSError):
                fs.delete_dir(entry.path)


def staging_dir_for(location: str | Path) -> Path:
    """An empty directory beside a local target (same filesystem, so the final rename is atomic), or in the temp
    dir for a remote one (uploaded from there).

    Its name records the process that owns it (``<prefix>tmp-<hex>-<pid>-<host>``): a build killed outright
    (SIGKILL, the OOM killer) runs no cleanup, so the next build removes what such builds left behind, and never
    the staging directory of a build still running (on this host or another one).
    """
    if is_remote(location):
        folder, prefix = Path(tempfile.gettempdir()), "raygpt-stage."
    else:
        target = local_path(location)
        folder, prefix = target.parent, f".{target.name}."
    folder.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(folder, prefix)
    staging = folder / f"{prefix}tmp-{uuid.uuid4().hex[:8]}-{os.getpid()}-{socket.gethostname()}"
    staging.mkdir()
    return staging


def _remove_abandoned(folder: Path, prefix: str) -> None:
    """Staging directories in ``folder`` named ``<prefix>tmp-...`` whose process (on this host) is gone, and the
    trash (``<prefix>old-...``) a local publish left."""
    for path in folder.glob(f"{glob.escape(prefix)}*"):
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
