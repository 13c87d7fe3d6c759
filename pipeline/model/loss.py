"""The LM head's cross-entropy computed a chunk of positions at a time, never holding the full logits.

For a small model the ``d_model x vocab`` head and its softmax dominate the step: with 50257 classes the logits of
a micro-batch are far larger than the rest of the activations, and ``F.cross_entropy`` on them makes several
memory-bound passes (log-softmax out, its gradient out, then the two matmuls of the head's backward).

:func:`linear_cross_entropy` gives the same loss and gradients as
``F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)`` (mean over the counted targets). Its
forward computes, per chunk of rows, the logits, their log-sum-exp, and then in place the gradient of the mean loss
with respect to them (``softmax - onehot``, scaled), and from that the chunk's gradients of ``hidden`` and
``weight``. Backward only scales those by the incoming gradient. Peak memory is one chunk's logits plus the gradient
buffers; the matmul work is the same three products as the unfused head, tiled over the vocabulary so that
each product's output fits the cache.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100
VOCAB_BLOCK = 2048  # classes per matmul tile of the logits and of the weight gradient


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_rows: int,
        with_grad: bool,
    ) -> torch.Tensor:
        vocab = weight.size(0)
        counted = targets != IGNORE_INDEX
        count = int(counted.sum())
        # Ignored targets get no gradient; with none counted the mean is 0/0 (NaN), as F.cross_entropy gives.
        scale = 1.0 / count if count else 0.0
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grad else None
        buffer = torch.empty(min(chunk_rows, hidden.size(0)), vocab, dtype=torch.float32, device=hidden.device)
        blocks = [slice(v, min(v + VOCAB_BLOCK, vocab)) for v in range(0, vocab, VOCAB_BLOCK)]
        for start in range(0, hidden.size(0), chunk_rows):
            h = hidden[start : start + chunk_rows]
            keep = counted[start : start + chunk_rows]
            safe = torch.where(keep, targets[start : start + chunk_rows], 0)[:, None]
            logits = buffer[: h.size(0)]
            for block in blocks:  # an output tile the cache holds: the (rows x vocab) product at once is ~2x slower
                if weight.dtype == torch.float32:  # straight into the buffer's columns, no temporary
                    torch.mm(h, weight[block].t(), out=logits[:, block])
                else:  # low-precision products, widened to fp32
                    logits[:, block].copy_(h @ weight[block].t())
            peak = logits.amax(dim=1, keepdim=True)
            picked = logits.gather(1, safe)
            exp = logits.sub_(peak).exp_()  # in the logits' memory from here on
            sums = exp.sum(dim=1, keepdim=True)
            total += torch.where(keep[:, None], peak + sums.log() - picked, 0.0).sum()
            if not with_grad:
                continue
            # d(mean loss)/d(logits) = (softmax - onehot(target)) / count on counted rows, 0 on the others
            row_scale = torch.where(keep[:, None], scale / sums, 0.0)
            grad = exp.mul_(row_scale)
            grad.scatter_add_(1, safe, torch.where(keep[:, None], -scale, 0.0))
            g = grad.to(weight.dtype)
            grad_hidden[start : start + chunk_rows] = g @ weight
            for block in blocks:
                if weight.dtype == torch.float32:
                    grad_weight[block].addmm_(g[:, block].t(), h)
                else:  # low-precision products, summed over chunks in fp32
                    grad_weight[block] += (g[:, block].t() @ h).float()
        if with_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / count if count else total * float("nan")

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype),
            grad_weight * grad_loss.to(grad_weight.dtype),
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 128
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (``-100`` ignored), in fp32.

    ``hidden`` is ``(..., d)``, ``weight`` ``(vocab, d)``, ``targets`` the leading shape of ``hidden``. Gradients are
    computed in the forward pass when autograd will need them (grad mode on and an input requiring grad).
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    flat = hidden.reshape(-1, hidden.size(-1))
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(flat, weight, targets.reshape(-1), chunk_rows, with_grad)
