"""Hugging Face GPT-2 directories in and out: ``raygpt export --hf DIR`` and ``raygpt import-hf DIR``.

Export writes ``config.json`` + ``model.safetensors`` that ``transformers.GPT2LMHeadModel.from_pretrained`` loads
(transformers is needed for the config only). Import reads such a directory (``model.safetensors``, or
``pytorch_model.bin`` through ``torch.load(weights_only=True)``, never an arbitrary pickle) without transformers,
so a user can fine-tune from GPT-2 weights they downloaded themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline import storage
from pipeline.export import ExportError, load_export, save_export
from pipeline.hf import LM_HEAD, from_hf_state_dict, gpt_config_to_hf, hf_config_to_gpt, to_hf_state_dict
from pipeline.tokenizer import DEFAULT_ENCODING, get_tokenizer


def export_hf(export: str, out_dir: str | Path) -> Path:
    """Write an export as a Hugging Face GPT-2 directory (staged, then moved into place)."""
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ExportError("`raygpt export --hf` needs transformers: pip install 'transformers>=4.45'") from exc
    model, info = load_export(export)
    try:
        hf_config = gpt_config_to_hf(info.model, architectures=["GPT2LMHeadModel"])
    except ValueError as exc:
        raise ExportError(f"cannot write {export} as GPT-2: {exc}") from None
    target = Path(out_dir)
    staging = storage.staging_dir_for(target)
    tensors = {k: v.contiguous() for k, v in to_hf_state_dict(model.state_dict()).items() if k != LM_HEAD}
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    hf_config.to_json_file(str(staging / "config.json"))
    (staging / "raygpt_export.json").write_text(json.dumps({"source": str(export), "tokenizer": info.tokenizer}))
    storage.publish_dir(staging, target)
    return target


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    safetensors_file = folder / "model.safetensors"
    if safetensors_file.is_file():
        return load_file(str(safetensors_file))
    pickle_file = folder / "pytorch_model.bin"
    if pickle_file.is_file():
        try:
            return torch.load(pickle_file, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses anything but tensors
            raise ExportError(f"{pickle_file} is not a plain tensor file ({exc.__class__.__name__})") from None
    raise ExportError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


def import_hf(hf_dir: str | Path, target: str) -> str:
    """A Hugging Face GPT-2 directory -> a raygpt export at ``target``."""
    folder = Path(hf_dir)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ExportError(f"{folder} is not a Hugging Face model directory: config.json is missing")
    try:
        hf_config: dict[str, Any] = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{config_file} is not valid JSON: {exc}") from None
    if hf_config.get("model_type") not in (None, "gpt2"):
        raise ExportError(f"{folder} holds a {hf_config.get('model_type')!r} model; only GPT-2 is supported")
    defaults = {
        "n_inner": None,
        "activation_function": "gelu_new",
        "tie_word_embeddings": True,
        "resid_pdrop": 0.1,
        "layer_norm_epsilon": 1e-5,
    }
    try:
        model_config = hf_config_to_gpt(SimpleNamespace(**{**defaults, **hf_config}))
    except (AttributeError, ValueError, TypeError) as exc:
        raise ExportError(f"unsupported GPT-2 config in {config_file}: {exc}") from None
    tokenizer = get_tokenizer(DEFAULT_ENCODING)
    if model_config.vocab_size != tokenizer.n_vocab:
        raise ExportError(
            f"{folder} has a {model_config.vocab_size}-token vocabulary; raygpt imports GPT-2 BPE models "
            f"({tokenizer.n_vocab} tokens)"
        )
    try:
        state = from_hf_state_dict(_read_hf_weights(folder))
    except (KeyError, ValueError) as exc:
        raise ExportError(f"cannot convert the weights in {folder}: {exc}") from None
    metadata = {"stage": "import-hf", "source": str(folder)}
    written = save_export(state, model_config, target, tokenizer.info(), metadata=metadata)
    load_export(written)  # names and shapes checked against the config before anyone trains on it
    return written
