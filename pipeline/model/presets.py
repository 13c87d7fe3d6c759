"""Model presets: the eight GPT-3 sizes of Brown et al. (2020), Table 2.1, plus two tiny CPU presets.

All GPT-3 presets use context length 2048 and the GPT-2 BPE vocabulary (50257 tokens). Two deliberate
deviations from the printed table, both following common reproductions:

* gpt3-xl uses 16 heads (the paper prints 24, which does not give its own d_head = 128 for d_model 2048);
* gpt3-13b uses d_model 5120 (the paper prints 5140, which is not divisible by its 40 heads).

GPT-3 alternates dense and locally banded sparse attention layers. The presets are dense by default
(``sparse_attention=False``); switch it on through the model config (``sparse_attention=True`` and
``local_window``).

``batch_tokens`` is the paper's batch size in tokens. Note that 3.2M (gpt3-175b) is not a whole number of
2048-token sequences (1562.5), so a trainer must round it.
"""

import difflib
from dataclasses import dataclass
from typing import Any

from pipeline.model.gpt import GPTConfig, count_params, flops_per_token


@dataclass(frozen=True)
class Preset:
    name: str
    model: GPTConfig
    batch_tokens: int  # batch size in tokens (GPT-3 paper)
    learning_rate: float  # peak learning rate
    description: str


class UnknownPresetError(KeyError, ValueError):
    """Raised by ``get_preset``; both a KeyError and a ValueError, with a readable message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _gpt3(name: str, n_layer: int, d_model: int, n_head: int, batch_tokens: int, lr: float, note: str) -> Preset:
    model = GPTConfig(vocab_size=50257, context_length=2048, n_layer=n_layer, n_head=n_head, d_model=d_model)
    return Preset(name, model, batch_tokens, lr, f"GPT-3 {note} (Brown et al. 2020, Table 2.1)")


# Insertion order is size order.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "nano",
            GPTConfig(vocab_size=50257, context_length=64, n_layer=2, n_head=2, d_model=64),
            batch_tokens=2048,
            learning_rate=1e-3,
            description="nano CPU model for fast tests",
        ),
        Preset(
            "tiny",
            GPTConfig(vocab_size=50257, context_length=128, n_layer=4, n_head=4, d_model=128),
            batch_tokens=2048,  # 16 sequences of 128: 2 workers x micro-batch 8
            learning_rate=2e-3,  # measured on the sample: 2e-3..6e-3, 1024- or 2048-token batches learn alike per token
            description="tiny CPU model: the default, pretrains on 2 CPU workers in minutes",
        ),
        _gpt3("gpt3-small", 12, 768, 12, 524288, 6.0e-4, "Small (125M)"),
        _gpt3("gpt3-medium", 24, 1024, 16, 524288, 3.0e-4, "Medium (350M)"),
        _gpt3("gpt3-large", 24, 1536, 16, 524288, 2.5e-4, "Large (760M)"),
        _gpt3("gpt3-xl", 24, 2048, 16, 1048576, 2.0e-4, "XL (1.3B; 16 heads, paper prints 24)"),
        _gpt3("gpt3-2.7b", 32, 2560, 32, 1048576, 1.6e-4, "2.7B"),
        _gpt3("gpt3-6.7b", 32, 4096, 32, 2097152, 1.2e-4, "6.7B"),
        _gpt3("gpt3-13b", 40, 5120, 40, 2097152, 1.0e-4, "13B (d_model 5120, paper prints 5140)"),
        _gpt3("gpt3-175b", 96, 12288, 96, 3200000, 0.6e-4, "175B"),
    )
}


def get_preset(name: str) -> Preset:
    """Look up a preset by name; unknown names raise ``UnknownPresetError`` listing the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UnknownPresetError(f"unknown model preset {name!r}{hint}; choose one of: {', '.join(PRESETS)}") from None


def preset_rows() -> list[dict[str, Any]]:
    """One summary row per preset, in size order (for tables / the CLI)."""
    rows = []
    for p in PRESETS.values():
        m = p.model
        rows.append(
            {
                "name": p.name,
                "n_layer": m.n_layer,
                "d_model": m.d_model,
                "n_head": m.n_head,
                "d_head": m.d_head,
                "context_length": m.context_length,
                "n_params": count_params(m),
                "flops_per_token": flops_per_token(m),
                "batch_tokens": p.batch_tokens,
                "learning_rate": p.learning_rate,
            }
        )
    return rows
