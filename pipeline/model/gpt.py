"""GPT-3-style decoder-only transformer in pure PyTorch (in the spirit of nanoGPT's model.py).

Module and parameter names map one to one onto Hugging Face ``GPT2LMHeadModel``
(``transformer.wte``, ``transformer.h.{i}.attn.c_attn``, ..., ``lm_head``), so exporting is a rename-free
copy. The only difference is the layout of the projection weights: we use ``nn.Linear`` (weight shaped
``(out, in)``) where GPT-2 uses ``Conv1D`` (weight shaped ``(in, out)``), so the exporter must transpose
``attn.c_attn.weight``, ``attn.c_proj.weight``, ``mlp.c_fc.weight`` and ``mlp.c_proj.weight``.

The model holds no training machinery: activation checkpointing, ZeRO-3 partitioning and the optimizer's
parameter groups are applied from outside (:mod:`pipeline.train.deepspeed`), so this file reads as the
architecture alone.

GPT-3's alternating dense / locally banded sparse attention is available through
``GPTConfig.sparse_attention``: odd layers (1, 3, 5, ...) then let query ``i`` attend only keys ``j`` with
``i - local_window < j <= i``.
"""

import functools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.loss import linear_cross_entropy

KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]
"""One ``(key, value)`` pair per layer, each shaped ``(B, n_head, T_past, d_head)``."""

INIT_STD = 0.02


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024  # maximum number of positions
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5
    sparse_attention: bool = False  # odd layers use a banded causal mask (GPT-3)
    local_window: int = 256  # band width of the sparse layers

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "d_model", "local_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(f"GPTConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """True for the locally banded layers (odd indices) when sparse attention is on."""
        return self.sparse_attention and layer_idx % 2 == 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GPTConfig":
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown GPTConfig key(s): {', '.join(unknown)}; valid keys: {', '.join(valid)}")
        return cls(**d)


class GPTOutput(NamedTuple):
    """A named tuple, so that hooks which walk a module's outputs (as parameter-partitioning trainers do in
    backward) see the tensors it holds."""

    logits: torch.Tensor | None  # (B, T_new, vocab_size); None when a chunked loss was asked for
    loss: torch.Tensor | None = None  # only when targets are given
    past_key_values: KVCache | None = None  # only when use_cache=True


def build_attention_mask(
    t_new: int,
    t_past: int = 0,
    *,
    local_window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean attention mask (True = may attend) shaped ``(B or 1, 1, t_new, t_past + t_new)``.

    Query ``i`` sits at cache index ``t_past + i`` and may attend key ``j`` iff ``j <= t_past + i`` (causal),
    ``j > t_past + i - local_window`` (band, sparse layers only) and ``key_padding_mask[:, j]`` is nonzero.
    A query may always attend itself, so padding queries never get an all-masked row (no NaN).
    """
    q_idx = torch.arange(t_past, t_past + t_new, device=device)[:, None]
    k_idx = torch.arange(t_past + t_new, device=device)[None, :]
    allowed = k_idx <= q_idx
    if local_window is not None:
        allowed = allowed & (k_idx > q_idx - local_window)
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.to(device=allowed.device, dtype=torch.bool)[:, None, None, :]
        allowed = allowed | (k_idx == q_idx)
    return allowed


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``mask`` None means plain causal attention over ``x`` only (SDPA ``is_causal``)."""
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, n_head, T, d_head); same q, k, v order and head split as GPT-2
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, kv = self.attn(self.ln_1(x), mask, past)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.d_model),
                wpe=nn.Embedding(config.context_length, config.d_model),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        if self.lm_head.weight.device.type != "meta":  # on meta (count_params) there is nothing to init;
            self.init_weights()  # after meta -> to_empty(), call init_weights() explicitly

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the very Parameter ``transformer.wte.weight`` (one Parameter, two names).
        Call again after anything that replaces parameters, e.g. ``load_state_dict(..., assign=True)``."""
        self.lm_head.weight = self.transformer.wte.weight

    def init_weights(self) -> None:
        """GPT-2 initialization of every module (see ``init_module``)."""
        for name, module in self.named_modules():
            self.init_module(name, module)

    def init_module(self, name: str, module: nn.Module) -> None:
        """GPT-2 init of one module's own parameters: N(0, 0.02) for Linear/Embedding weights, zero biases,
        LayerNorm (1, 0), and N(0, 0.02/sqrt(2*n_layer)) for the residual projections ``*.c_proj``.

        Only whole-parameter ``nn.init`` calls, one module at a time: a trainer that partitions parameters as
        modules are built (the ZeRO-3 build in :mod:`pipeline.train.deepspeed`) gathers one module's parameters,
        calls this for it and partitions them again.
        """
        if isinstance(module, nn.Linear):
            std = INIT_STD
            if name.endswith(("attn.c_proj", "mlp.c_proj")):
                std = INIT_STD / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, tied weight counted once; ``non_embedding`` drops position embeddings only."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def attention_mask_for(
        self,
        layer_idx: int,
        t_new: int,
        t_past: int = 0,
        attention_mask: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor | None:
        """Boolean mask layer ``layer_idx`` uses, or None when plain causal SDPA (``is_causal``) suffices."""
        window = self.config.local_window if self.config.is_sparse_layer(layer_idx) else None
        if window is None and t_past == 0 and attention_mask is None:
            return None
        return build_attention_mask(t_new, t_past, local_window=window, key_padding_mask=attention_mask, device=device)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        loss_chunk_rows: int | None = None,
    ) -> GPTOutput:
        """``input_ids`` (B, T_new); ``targets`` (B, T_new) with -100 = ignored; ``attention_mask``
        (B, T_past + T_new) with 1 = real token, 0 = padding (left padding for batched prompts).

        With ``targets`` and ``loss_chunk_rows``, the loss is :func:`~pipeline.model.loss.linear_cross_entropy` over
        chunks of that many positions and ``logits`` is None: the full logits are never built."""
        cfg = self.config
        B, T = input_ids.shape
        device = input_ids.device
        if past_key_values is not None and len(past_key_values) != cfg.n_layer:
            raise ValueError(f"past_key_values has {len(past_key_values)} layers, the model has {cfg.n_layer}")
        t_past = past_key_values[0][0].size(2) if past_key_values else 0
        if t_past + T > cfg.context_length:
            raise ValueError(
                f"sequence length {t_past + T} (past {t_past} + new {T}) exceeds context_length {cfg.context_length}"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (B, t_past + T):
            raise ValueError(
                f"attention_mask must have shape (B, T_past + T_new) = {(B, t_past + T)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if position_ids is None:
            if attention_mask is not None:  # HF convention: count real tokens, so left padding is skipped
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, t_past:]
            else:
                position_ids = torch.arange(t_past, t_past + T, device=device).unsqueeze(0)

        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(position_ids))
        masks: dict[bool, torch.Tensor | None] = {}  # built once per kind (dense / banded)
        present: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, block in enumerate(self.transformer.h):
            kind = cfg.is_sparse_layer(i)
            if kind not in masks:
                masks[kind] = self.attention_mask_for(i, T, t_past, attention_mask, device)
            past = past_key_values[i] if past_key_values else None
            x, kv = block(x, masks[kind], past)
            if use_cache:
                present.append(kv)
        x = self.transformer.ln_f(x)
        cache = tuple(present) if use_cache else None
        if targets is not None and loss_chunk_rows is not None:
            loss = linear_cross_entropy(x, self.lm_head.weight, targets, loss_chunk_rows)
            return GPTOutput(logits=None, loss=loss, past_key_values=cache)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return GPTOutput(logits=logits, loss=loss, past_key_values=cache)


@functools.lru_cache(maxsize=64)  # GPTConfig is frozen, hence hashable
def count_params(cfg: GPTConfig) -> int:
    """Exact parameter count (tied LM head counted once), built on the meta device: no memory allocated.

    The first meta build in a process takes ~1 s extra: ``nn.Embedding.reset_parameters`` calls ``normal_``
    on a meta tensor, which PyTorch routes through a Python reference that imports ``torch._dynamo``.
    """
    with torch.device("meta"):
        return GPT(cfg).num_params()


def flops_per_token(cfg: GPTConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward), the PaLM / nanoGPT MFU convention:
    ``6 * N + 12 * n_layer * d_model * T``.

    ``N`` is the parameter count without position embeddings (the token embedding stays in, because the
    tied LM head does a real ``d_model x vocab`` matmul with it); ``12 * L * d * T`` is the attention
    score/value matmuls; ``T`` is ``seq_len`` or ``cfg.context_length``.
    """
    t = cfg.context_length if seq_len is None else seq_len
    n = count_params(cfg) - cfg.context_length * cfg.d_model
    return 6 * n + 12 * cfg.n_layer * cfg.d_model * t
