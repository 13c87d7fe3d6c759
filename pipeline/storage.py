"""Local paths and cloud URIs (s3://, gs://, file://) behind one small interface, through pyarrow filesystems."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs


def is_remote(location: str | Path) -> bool:
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | Path) -> Path:
    """A local path for a plain path or a file:// URI (raises for remote URIs)."""
    text = str(location)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    if is_remote(text):
        raise ValueError(f"{text!r} is not on the local filesystem")
    return Path(text)


def join(location: str | Path, *parts: str) -> str:
    text = str(location).rstrip("/")
    return "/".join([text, *parts]) if is_remote(text) else str(Path(text, *parts))


def exists(location: str | Path) -> bool:
    if not is_remote(location):
        return local_path(location).exists()
    fs, path = pafs.FileSystem.from_uri(str(location))
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def download_dir(location: str | Path, cache_root: str | Path | None = None) -> Path:
    """A local copy of a directory: the directory itself when local, else a fresh download of the URI."""
    if not is_remote(location):
        return local_path(location)
    root = Path(cache_root or tempfile.gettempdir()) / "raygpt-downloads"
    root.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(dir=root))
    pafs.copy_files(str(location), str(target))
    return target


def publish_dir(local_dir: Path, location: str | Path, last: str | None = None) -> str:
    """Move a finished local directory into place atomically (local), or upload it (remote, target replaced).

    Object stores have no atomic directory rename, so the file named ``last`` (the one readers look for
    first, e.g. a manifest or config.json) is uploaded after everything else.
    """
    if is_remote(location):
        fs, path = pafs.FileSystem.from_uri(str(location))
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
        if kind == "old":  # publish_dir's renamed previous version: never read again
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
