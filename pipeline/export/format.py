"""The export format every stage agrees on: ``model.safetensors`` + ``config.json``.

Training writes it, serving and fine-tuning read it. Weights are never pickled. The tied LM head is stored once
(as ``transformer.wte.weight``). ``config.json`` holds the model config, the tokenizer's name and file hash, and
the weights file's sha256, so a truncated or swapped file is caught at load time. An export is written to a
staging directory and moved into place only when complete.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline import storage
from pipeline.layout import EXPORT_CONFIG, is_complete_export
from pipeline.model.gpt import GPT, GPTConfig

EXPORT_FORMAT = "raygpt-export"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = EXPORT_CONFIG  # written last: a directory holding it is a complete export
TIED_KEYS = ("lm_head.weight",)


class ExportError(RuntimeError):
    """An export directory is missing, incomplete, corrupt or of another format."""


@dataclass(frozen=True)
class ExportInfo:
    model: GPTConfig
    tokenizer: dict[str, Any]
    location: str
    metadata: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""


def save_export(
    model: GPT | Mapping[str, torch.Tensor],
    model_config: GPTConfig,
    location: str | Path,
    tokenizer: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> str:
    """Write an export to ``location`` (directory or URI), replacing what is there only once complete. What is
    there must be nothing, an empty folder or an export, unless ``overwrite``: a folder of other files is refused."""
    check_replaceable(location, is_complete_export, "a raygpt export", overwrite)
    state = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    tensors = {
        name: tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous()
        for name, tensor in state.items()
        if name not in TIED_KEYS
    }
    publish = storage.Staged(location, last=CONFIG_FILE)
    with publish as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": EXPORT_FORMAT})
        document = {
            "format": EXPORT_FORMAT,
            "format_version": FORMAT_VERSION,
            "model": model_config.to_dict(),
            "tokenizer": {key: tokenizer[key] for key in ("name", "sha256") if key in tokenizer},
            "weights": {
                "file": WEIGHTS_FILE,
                "sha256": storage.file_sha256(staging / WEIGHTS_FILE),
                "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
                "n_params": sum(t.numel() for t in tensors.values()),
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metadata": dict(metadata or {}),
        }
        (staging / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return publish.published


def check_replaceable(location: str | Path, is_kind: Any, kind: str, overwrite: bool) -> None:
    """Refuse to publish over anything but nothing, an empty folder or ``kind`` (``is_kind(location)``), since
    publishing replaces the whole folder."""
    if overwrite or storage.is_empty(location) or is_kind(str(location)):
        return
    raise ExportError(
        f"{str(location)!r} holds files and is not {kind}; refusing to replace it (choose another folder, or pass "
        "--overwrite to replace everything in it)"
    )


def read_export_info(location: str | Path) -> tuple[ExportInfo, str]:
    """Parse and check ``config.json`` of an export (read alone, nothing else is fetched); returns the info and
    where the visible version's files are (see :func:`pipeline.storage.resolve`)."""
    if not storage.exists(location):
        raise ExportError(f"export {str(location)!r} does not exist")
    directory = storage.resolve(location)
    config_path = storage.join(directory, CONFIG_FILE)
    if not storage.exists(config_path):
        raise ExportError(f"{str(location)!r} is not a raygpt export: {CONFIG_FILE} is missing")
    try:
        document = json.loads(storage.read_bytes(config_path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{CONFIG_FILE} of export {str(location)!r} is not valid JSON: {exc}") from exc
    problem = storage.format_problem(document, EXPORT_FORMAT, FORMAT_VERSION)
    if problem is not None:
        kind = "is not a raygpt export" if "no format" in problem else "cannot be read"
        raise ExportError(f"{str(location)!r} {kind}: {CONFIG_FILE} {problem}")
    try:
        model_config = GPTConfig.from_dict(document["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"export {str(location)!r} has an invalid model config: {exc}") from exc
    info = ExportInfo(
        model=model_config,
        tokenizer=dict(document.get("tokenizer") or {}),
        location=str(location),
        metadata=dict(document.get("metadata") or {}),
        weights_sha256=str((document.get("weights") or {}).get("sha256", "")),
    )
    return info, directory


def _local_weights(location: str | Path, weights_location: str, sha256: str) -> Path:
    """The weights file on local disk, checked against the sha256 in config.json (remote weights come through
    the content-addressed cache, which verifies them as they are downloaded)."""
    if not storage.exists(weights_location):
        raise ExportError(f"export {str(location)!r} is incomplete: {WEIGHTS_FILE} is missing")
    mismatch = ExportError(f"{WEIGHTS_FILE} of export {str(location)!r} does not match the sha256 in {CONFIG_FILE}")
    if storage.is_remote(weights_location):
        if not sha256:
            raise ExportError(f"{CONFIG_FILE} of export {str(location)!r} records no sha256 for {WEIGHTS_FILE}")
        try:
            return storage.cached_file(weights_location, sha256)
        except storage.StorageError as exc:
            raise ExportError(f"cannot fetch {WEIGHTS_FILE} of export {str(location)!r}: {exc}") from None
    weights = storage.local_path(weights_location)
    if sha256 and storage.file_sha256(weights) != sha256:
        raise mismatch
    return weights


def load_export(
    location: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[GPT, ExportInfo]:
    """Load an export into a ready ``GPT`` (eval mode) after verifying the weights' hash and names."""
    info, directory = read_export_info(location)
    weights = _local_weights(location, storage.join(directory, WEIGHTS_FILE), info.weights_sha256)
    try:
        tensors = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"cannot read {WEIGHTS_FILE} of export {str(location)!r}: {exc}") from exc
    if dtype is not None:
        tensors = {name: tensor.to(dtype) for name, tensor in tensors.items()}
    with torch.device("meta"):
        model = GPT(info.model)
    expected = {name: p for name, p in model.state_dict().items() if name not in TIED_KEYS}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ExportError(
            f"export {str(location)!r} does not match its model config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ExportError(
                f"export {str(location)!r}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"the model config needs {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    leftovers = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise ExportError(f"export {str(location)!r} left tensors uninitialized: {leftovers[:5]}")
    return model.eval(), info
