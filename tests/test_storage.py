"""pipeline.storage against a real S3-protocol server (the ``s3`` fixture) and local disk: whole-file writes,
versioned publishing with a pointer, the content-addressed cache and its bound, temporary copies."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline import storage
from pipeline.layout import RunLayout
from pipeline.train.checkpoint import latest_checkpoint


def _publish(location: str, content: str) -> str:
    staged = storage.Staged(location, last="config.json")
    with staged as staging:
        (staging / "weights.bin").write_text(content * 100)
        (staging / "config.json").write_text(json.dumps({"content": content}))
    return staged.published


def _config(location: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(storage.resolve(location), "config.json")))


def test_single_files_round_trip_on_s3_and_local(s3: str, tmp_path: Path) -> None:
    for location in (f"{s3}/files/state.json", str(tmp_path / "sub" / "state.json")):
        assert not storage.exists(location)
        storage.write_bytes(location, b'{"a": 1}')
        storage.write_bytes(location, b'{"a": 2}')
        assert storage.read_bytes(location) == b'{"a": 2}' and storage.exists(location)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["state.json"]  # no temp file left


def test_publishing_on_s3_switches_versions_through_the_pointer(s3: str) -> None:
    location = f"{s3}/published/export"
    assert _publish(location, "one") == location
    first = storage.resolve(location)
    assert first.startswith(f"{location}/{storage.VERSIONS}/") and _config(location) == {"content": "one"}
    _publish(location, "two")
    second = storage.resolve(location)
    assert second != first and _config(location) == {"content": "two"}
    assert storage.exists(storage.join(first, "config.json"))  # the previous version stays readable
    _publish(location, "three")
    fs, root = storage.filesystem(f"{location}/{storage.VERSIONS}")
    kept = sorted(e.base_name for e in fs.get_file_info(pafs.FileSelector(root)))
    assert kept == sorted([second.rsplit("/", 1)[-1], storage.resolve(location).rsplit("/", 1)[-1]])

    with pytest.raises(RuntimeError), storage.Staged(location) as staging:  # a failed publish changes nothing
        (staging / "config.json").write_text("{}")
        raise RuntimeError("interrupted")
    assert _config(location) == {"content": "three"}


def test_files_tasks_write_into_the_shared_location_are_published_with_the_staged_ones(s3: str, tmp_path: Path) -> None:
    for location in (f"{s3}/shared/data", str(tmp_path / "data")):
        staged = storage.Staged(location, last="manifest.json")
        with staged as staging:
            if storage.is_remote(location):  # the new version's prefix: no local copy, no second upload
                assert staged.shared.startswith(f"{location}/{storage.VERSIONS}/")
            else:
                assert staged.shared == str(staging)
            storage.write_bytes(storage.join(staged.shared, "train", "shard.parquet"), b"rows")
            (staging / "manifest.json").write_text("{}")
            assert not storage.exists(storage.join(storage.resolve(location), "manifest.json"))  # not visible yet
        visible = storage.resolve(location)
        assert storage.read_bytes(storage.join(visible, "train", "shard.parquet")) == b"rows"
        assert storage.read_bytes(storage.join(visible, "manifest.json")) == b"{}"

        failed = storage.Staged(location, last="manifest.json")
        with pytest.raises(RuntimeError), failed:  # a failed build publishes nothing and leaves nothing
            storage.write_bytes(storage.join(failed.shared, "train", "shard.parquet"), b"other rows")
            raise RuntimeError("interrupted")
        assert storage.resolve(location) == visible and not storage.exists(failed.shared)
        assert storage.read_bytes(storage.join(visible, "train", "shard.parquet")) == b"rows"


def test_unpublished_remote_directories_resolve_to_themselves(s3: str) -> None:
    storage.write_bytes(f"{s3}/plain/dir/config.json", b"{}")
    assert storage.resolve(f"{s3}/plain/dir") == f"{s3}/plain/dir"


def test_cache_is_content_addressed_verified_and_bounded(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(storage.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(storage.CACHE_BYTES_ENV, "2500")
    blobs = {name: name.encode() * 1000 for name in ("a", "b", "c")}  # 1000 bytes each
    for name, data in blobs.items():
        storage.write_bytes(f"{s3}/cache/{name}", data)
    got = {
        name: storage.cached_file(f"{s3}/cache/{name}", hashlib.sha256(data).hexdigest())
        for name, data in blobs.items()
    }
    assert got["c"].read_bytes() == blobs["c"]
    entries = sorted(p.name for p in (tmp_path / "cache" / "sha256").iterdir())
    assert len(entries) == 2 and hashlib.sha256(blobs["a"]).hexdigest() not in entries  # least recently used went
    with pytest.raises(storage.StorageError, match="does not match"):
        storage.cached_file(f"{s3}/cache/a", hashlib.sha256(b"something else").hexdigest())
    assert len(list((tmp_path / "cache" / "sha256").iterdir())) == 2  # nothing half-written stays


def test_local_copy_of_a_remote_directory_is_removed_after_use(s3: str) -> None:
    storage.write_bytes(f"{s3}/copy/d/x.bin", b"x")
    with storage.local_copy(f"{s3}/copy/d") as local:
        assert (local / "x.bin").read_bytes() == b"x"
    assert not local.exists()


@pytest.mark.parametrize("name", ["run#1", "run?x", "run%20"])
def test_checkpoints_are_found_in_run_dirs_with_uri_characters(tmp_path: Path, name: str) -> None:
    layout = RunLayout(str(tmp_path / name))
    checkpoint = Path(layout.experiment("pretrain")) / "checkpoint_000"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 7}))
    assert latest_checkpoint(layout, "pretrain") == (str(checkpoint), 7)


def test_a_write_killed_midway_leaves_the_old_file_whole(tmp_path: Path) -> None:
    """summary.json, metrics.jsonl and every other single file go through write_bytes: a writer killed in the
    middle of a large write leaves the previous content, never a part of the new one."""
    import os
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "summary.json"
    target.write_bytes(b'{"old": true}\n')
    code = f"import sys; from pipeline import storage; storage.write_bytes({str(target)!r}, b'x' * (400 * 2**20))"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in tmp_path.iterdir() if p.name.startswith(".summary.json.tmp-")]
            if partial and partial[0].stat().st_size > 50 * 2**20:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the write finished before it could be interrupted"
    assert target.read_bytes() == b'{"old": true}\n'
