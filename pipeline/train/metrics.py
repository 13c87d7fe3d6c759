"""Training metrics: the per-step JSONL log, the matmul peak used for MFU, the unigram yardstick, the loss curve."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch


class MetricsLog:
    """Rows of per-step metrics, kept in memory (they travel inside checkpoints) and appended to a local JSONL
    file when one is given. Restoring from a checkpoint rewrites the file up to the checkpoint's step, so a
    resumed run never shows a step twice."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def restore(self, lines: Iterable[str], upto_step: int) -> None:
        self.rows = [row for row in map(json.loads, filter(None, lines)) if row["step"] <= upto_step]
        if self.path is not None:
            self.path.write_text(self.text())

    def append(self, row: dict[str, Any]) -> None:
        row = {"time": round(time.time(), 3), **row}
        self.rows.append(row)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")

    def text(self) -> str:
        return "".join(json.dumps(row) + "\n" for row in self.rows)


def measure_peak_flops(device: torch.device, size: int = 1024, repeats: int = 5) -> float:
    """Achieved fp32 (CPU) or bf16 (GPU) matmul FLOP/s of one worker: the denominator of MFU when no peak is
    configured."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm up
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def unigram_cross_entropy(token_counts: np.ndarray) -> float:
    """Entropy (nats/token) of the corpus' own unigram distribution: the cross-entropy of the best model that
    ignores context, on the very tokens it was fit to. A language model must beat it to have learned anything."""
    counts = token_counts[token_counts > 0].astype(np.float64)
    probs = counts / counts.sum()
    return float(-(probs * np.log(probs)).sum())


def plot_loss_curve(rows: list[dict[str, Any]], title: str, yardstick: float | None = None) -> bytes:
    """A PNG of train (and validation) loss per step, with the unigram yardstick as a line."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", linewidth=1)
    val = [r for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    if yardstick is not None:
        ax.axhline(yardstick, color="grey", linestyle="--", label=f"unigram CE {yardstick:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def token_counts(store: Any, tokenizer: dict[str, Any], chunk: int = 4096) -> np.ndarray:
    """Occurrences of every token id in a split's packed sequences, read chunk by chunk."""
    counts = np.zeros(int(tokenizer.get("n_vocab", 50257)), dtype=np.int64)
    for start in range(0, len(store), chunk):
        rows = store.read(start, min(start + chunk, len(store)))
        counts += np.bincount(np.asarray(rows).reshape(-1), minlength=counts.size)[: counts.size]
    return counts


def unigram_cross_entropy_on(token_counts: np.ndarray, store: Any, chunk: int = 4096) -> float:
    """Cross-entropy (nats/token) on another split's targets of the unigram model fit to ``token_counts``
    (add-one smoothed): the like-for-like yardstick for a validation loss."""
    probs = (token_counts.astype(np.float64) + 1.0) / (token_counts.sum() + token_counts.size)
    log_probs = np.log(probs)
    total, count = 0.0, 0
    for start in range(0, len(store), chunk):
        targets = np.asarray(store.read(start, min(start + chunk, len(store))))[:, 1:].reshape(-1)
        total -= float(log_probs[targets].sum())
        count += targets.size
    return total / max(count, 1)
