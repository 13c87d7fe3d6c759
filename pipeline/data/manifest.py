"""The dataset manifest: what a tokenized dataset holds, how it was made, and whether a location may be (re)written.

``manifest.json`` sits at the root of a dataset directory and is written last, after every shard: a directory with
a manifest is complete. Shard paths in it are relative to that directory. Two builds with the same ``fingerprint``
(format version, settings, tokenizer file and input files with size and mtime) produce the same dataset.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.data.errors import DataError
from pipeline.data.sources import filesystem

FORMAT = "raygpt-dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def fingerprint(identity: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of what defines a dataset (settings, tokenizer, inputs)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Shard:
    path: str  # relative to the dataset directory
    rows: int
    sha256: str


@dataclass(frozen=True)
class Split:
    """One split: its shards in order and its counts (``stats`` holds every count the manifest records)."""

    name: str
    shards: tuple[Shard, ...]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(shard.rows for shard in self.shards)

    @property
    def sequences(self) -> int:
        """Packed sequences (pretraining) or examples (fine-tuning): the number of rows."""
        return self.rows

    @property
    def tokens(self) -> int:
        return int(self.stats.get("tokens", 0))

    @property
    def documents(self) -> int:
        return int(self.stats.get("documents", self.stats.get("examples", 0)))

    @property
    def dropped_tokens(self) -> int:
        return int(self.stats.get("dropped_tokens", 0))


@dataclass(frozen=True)
class Manifest:
    """A loaded manifest. ``location`` is the dataset directory (local path or URI); ``data`` the raw JSON."""

    location: str
    data: dict[str, Any]

    @property
    def kind(self) -> str:
        """``pretrain`` (packed sequences) or ``finetune`` (prompt/completion examples)."""
        return str(self.data["kind"])

    @property
    def context_length(self) -> int:
        return int(self.data["context_length"])

    @property
    def sequence_length(self) -> int:
        """Ids per pretraining row: context_length + 1 (inputs and shifted targets)."""
        return int(self.data["context_length"]) + 1

    @property
    def tokenizer(self) -> dict[str, Any]:
        """name, sha256 (of the .tiktoken file), n_vocab, eot_id."""
        return dict(self.data["tokenizer"])

    @property
    def dtype(self) -> str:
        return str(self.data["dtype"])

    @property
    def fingerprint(self) -> str:
        return str(self.data["fingerprint"])

    @property
    def splits(self) -> dict[str, Split]:
        return {
            name: Split(
                name,
                tuple(Shard(s["path"], int(s["rows"]), s.get("sha256", "")) for s in info["shards"]),
                {k: v for k, v in info.items() if k != "shards"},
            )
            for name, info in self.data["splits"].items()
        }

    def shard_uri(self, shard: Shard | str) -> str:
        return storage.join(self.location, shard.path if isinstance(shard, Shard) else shard)


def read_json(location: str) -> dict[str, Any] | None:
    """The manifest JSON at a dataset directory, None when there is none; DataError when unreadable."""
    fs, path = filesystem(storage.join(location, MANIFEST))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None
    try:
        with fs.open_input_stream(path) as stream:
            data = json.loads(stream.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{storage.join(location, MANIFEST)}: corrupt manifest ({exc}); rebuild the dataset") from None
    problem = storage.format_problem(data, FORMAT, FORMAT_VERSION)
    if problem is not None:
        raise DataError(f"{storage.join(location, MANIFEST)}: not a dataset manifest this raygpt reads ({problem})")
    return data


def missing_shards(location: str, data: dict[str, Any]) -> list[str]:
    missing = []
    for info in data.get("splits", {}).values():
        for shard in info.get("shards", []):
            uri = storage.join(location, shard["path"])
            fs, path = filesystem(uri)
            if fs.get_file_info(path).type != pafs.FileType.File:
                missing.append(uri)
    return missing


def _dir_has_content(location: str) -> bool:
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return False
    if info.type == pafs.FileType.File:
        return True
    return bool(fs.get_file_info(pafs.FileSelector(path, recursive=False)))


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = []
    for key in ("settings", "tokenizer"):
        before, after = old.get(key, {}), new.get(key, {})
        for name in sorted(set(before) | set(after)):
            if before.get(name) != after.get(name):
                changed.append(f"{key}.{name}: {before.get(name)!r} -> {after.get(name)!r}")
    old_inputs = {i["uri"]: i for i in old.get("inputs", [])}
    new_inputs = {i["uri"]: i for i in new.get("inputs", [])}
    added = len(set(new_inputs) - set(old_inputs))
    removed = len(set(old_inputs) - set(new_inputs))
    modified = sum(
        1
        for uri in set(old_inputs) & set(new_inputs)
        if (old_inputs[uri].get("size"), old_inputs[uri].get("mtime_ns"))
        != (new_inputs[uri].get("size"), new_inputs[uri].get("mtime_ns"))
    )
    if added or removed or modified:
        changed.append(f"inputs: {added} added, {removed} removed, {modified} changed")
    if old.get("blend") != new.get("blend"):
        changed.append(f"sources: {old.get('blend')} -> {new.get('blend')}")
    return "; ".join(changed[:6]) or "a different build"


def check_target(
    location: str, identity: dict[str, Any], new_fingerprint: str, overwrite: bool, replace_changed: bool = False
) -> bool:
    """True when ``location`` already holds exactly this dataset (nothing to do).

    Refuses (DataError) to replace anything else unless ``overwrite`` (rebuild whatever is there) or, for another
    build of a raygpt dataset, ``replace_changed`` (what ``raygpt run`` does with its own run directory).
    """
    visible = storage.resolve(location)
    try:
        existing = read_json(visible)
    except DataError:
        if overwrite:
            return False
        raise DataError(
            f"{location} holds an unreadable dataset manifest; pass --overwrite to replace the dataset"
        ) from None
    if existing is not None:
        if existing.get("fingerprint") == new_fingerprint and not missing_shards(visible, existing):
            return not overwrite
        if overwrite or replace_changed:
            return False
        raise DataError(
            f"{location} already holds a different dataset ({_differences(existing, identity)}); "
            "pass --overwrite to replace it"
        )
    if _dir_has_content(location) and not overwrite:
        raise DataError(f"{location} exists and is not a raygpt dataset; pass --overwrite to replace it")
    return False
