"""Hugging Face GPT-2 both ways: parameter conversion, ``raygpt export --hf DIR`` and ``raygpt import-hf DIR``.

Parameter names are identical to ``GPT2LMHeadModel``'s (``transformer.h.{i}.attn.c_attn.weight``, ...). Two
differences only:

* GPT-2 stores the four projection weights as ``Conv1D`` (shaped ``(in, out)``) where we use ``nn.Linear``
  (``(out, in)``): ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc`` and ``mlp.c_proj`` weights are transposed;
* the LM head is tied to the token embedding in both, so ``lm_head.weight`` is always the embedding.

Export writes ``config.json`` + ``model.safetensors`` that ``transformers.GPT2LMHeadModel.from_pretrained`` loads
(transformers is needed for the config only, and imported inside the functions that build its objects). Import
reads such a directory (``model.safetensors``, or ``pytorch_model.bin`` through ``torch.load(weights_only=True)``,
never an arbitrary pickle) without transformers, so a user can fine-tune from GPT-2 weights they downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from pipeline import storage
from pipeline.export.format import ExportError, check_replaceable, load_export, save_export
from pipeline.export.hf_tokenizer import hf_tokenizer
from pipeline.model.gpt import GPTConfig
from pipeline.model.tokenizer import DEFAULT_ENCODING, get_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from transformers import GPT2Config

CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
LM_HEAD = "lm_head.weight"
WTE = "transformer.wte.weight"
# HF GPT-2 buffers some versions keep in the state dict (causal mask tables); never weights.
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")


def gpt_config_to_hf(cfg: GPTConfig, **overrides: Any) -> GPT2Config:
    """The ``GPT2Config`` of the same architecture (dropout kept, tanh GELU, tied head).

    GPT-3's banded sparse attention has no GPT-2 equivalent: such a config is refused.
    """
    from transformers import GPT2Config

    if cfg.sparse_attention:
        raise ValueError("GPT-2 has no locally banded sparse attention; cannot convert a sparse_attention model")
    if not cfg.bias:
        raise ValueError("GPT-2 always has biases; cannot convert a model with bias=False")
    eot = cfg.vocab_size - 1
    kwargs: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.context_length,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=None,  # 4 * n_embd
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.layer_norm_eps,
        activation_function="gelu_new",
        bos_token_id=eot,
        eos_token_id=eot,
        tie_word_embeddings=True,
    )
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def hf_config_to_gpt(hf_config: Any) -> GPTConfig:
    """Our ``GPTConfig`` for a ``GPT2Config`` (or anything with its attribute names)."""
    n_inner = getattr(hf_config, "n_inner", None)
    if n_inner not in (None, 4 * hf_config.n_embd):
        raise ValueError(f"only 4x MLPs are supported (n_inner={n_inner}, n_embd={hf_config.n_embd})")
    activation = getattr(hf_config, "activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"only the tanh GELU ('gelu_new') is supported, got activation_function={activation!r}")
    if not getattr(hf_config, "tie_word_embeddings", True):
        raise ValueError("only models whose LM head is tied to the token embedding are supported")
    return GPTConfig(
        vocab_size=hf_config.vocab_size,
        context_length=hf_config.n_positions,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        d_model=hf_config.n_embd,
        dropout=float(getattr(hf_config, "resid_pdrop", 0.0)),
        layer_norm_eps=float(hf_config.layer_norm_epsilon),
    )


def to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (with or without ``lm_head.weight``) -> a ``GPT2LMHeadModel`` state dict."""
    if WTE not in state:
        raise KeyError(f"state dict has no {WTE}")
    out = {name: t.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else t for name, t in state.items()}
    out[LM_HEAD] = out[WTE]  # tied
    return out


def from_hf_state_dict(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``GPT2LMHeadModel`` (or ``GPT2Model``, names without ``transformer.``) state dict -> ours.

    The LM head must be the embedding (tied); mask buffers of older transformers versions are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state.items():
        if name.endswith(_HF_BUFFERS):
            continue
        if name != LM_HEAD and not name.startswith("transformer."):
            name = f"transformer.{name}"
        out[name] = tensor.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else tensor
    if WTE not in out:
        raise KeyError(f"Hugging Face state dict has no {WTE}")
    head = out.get(LM_HEAD)
    if head is not None and head.data_ptr() != out[WTE].data_ptr() and not torch.equal(head, out[WTE]):
        raise ValueError("lm_head.weight differs from the token embedding: untied heads are not supported")
    out[LM_HEAD] = out[WTE]
    return out


def is_hf_model_dir(location: str) -> bool:
    """A folder holding a Hugging Face model (its config.json names a model_type)."""
    config = Path(location) / "config.json"
    try:
        return "model_type" in json.loads(config.read_text())
    except (OSError, ValueError, TypeError):
        return False


def export_hf(export: str, out_dir: str | Path, overwrite: bool = False, tokenizer_file: str | None = None) -> Path:
    """Write an export as a Hugging Face GPT-2 directory with its tokenizer (staged, then moved into place);
    ``out_dir`` must be new, empty or a Hugging Face model directory unless ``overwrite``."""
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
    check_replaceable(target, is_hf_model_dir, "a Hugging Face model directory", overwrite)
    tensors = {k: v.contiguous() for k, v in to_hf_state_dict(model.state_dict()).items() if k != LM_HEAD}
    with storage.Staged(target) as staging:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        hf_config.to_json_file(str(staging / "config.json"))
        tokenizer = get_tokenizer(info.tokenizer.get("name", "r50k_base"), tokenizer_file)
        hf_tokenizer(tokenizer, info.model.context_length).save_pretrained(str(staging))
        (staging / "raygpt_export.json").write_text(json.dumps({"source": str(export), "tokenizer": info.tokenizer}))
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


def import_hf(hf_dir: str | Path, target: str, overwrite: bool = False) -> str:
    """A Hugging Face GPT-2 directory -> a raygpt export at ``target`` (never the source folder or one around it:
    publishing replaces the target whole)."""
    folder = Path(hf_dir)
    if not storage.is_remote(target):
        source, destination = folder.resolve(), storage.local_path(target).resolve()
        if source == destination or source.is_relative_to(destination) or destination.is_relative_to(source):
            raise ExportError(f"cannot import {folder} into {target}: the export would replace its own source")
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
    written = save_export(state, model_config, target, tokenizer.info(), metadata=metadata, overwrite=overwrite)
    load_export(written)  # names and shapes checked against the config before anyone trains on it
    return written
