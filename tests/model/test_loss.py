"""The chunked LM-head cross-entropy gives F.cross_entropy's loss and gradients without building the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.gpt import GPT, GPTConfig
from pipeline.model.loss import VOCAB_BLOCK, linear_cross_entropy

VOCAB, D = 1000, 24


def _reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=-100)


def _grads(loss_fn, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = loss_fn(h, w, targets)
    (3.0 * loss).backward()  # an upstream gradient other than 1
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_loss_and_gradients_equal_cross_entropy_on_the_full_logits(chunk_rows: int) -> None:
    torch.manual_seed(0)
    hidden, weight = torch.randn(50, D), torch.randn(VOCAB, D) * 0.5
    targets = torch.randint(0, VOCAB, (50,))
    targets[[3, 17, 18, 49]] = -100
    expected = _grads(_reference, hidden, weight, targets)
    got = _grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows), hidden, weight, targets)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)


def test_a_vocabulary_of_several_tiles_gives_the_same_loss_and_gradients() -> None:
    torch.manual_seed(0)
    vocab = 2 * VOCAB_BLOCK + 123  # two full tiles of logits columns and a partial one
    hidden, weight = torch.randn(40, D), torch.randn(vocab, D) * 0.5
    targets = torch.randint(0, vocab, (40,))
    targets[[0, 39]] = -100
    expected = _grads(_reference, hidden, weight, targets)
    got = _grads(lambda h, w, t: linear_cross_entropy(h, w, t, 16), hidden, weight, targets)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_give_fp32_losses_close_to_cross_entropy_in_fp32() -> None:
    torch.manual_seed(0)
    vocab = VOCAB_BLOCK + 500
    hidden, weight = torch.randn(24, D).bfloat16(), (torch.randn(vocab, D) * 0.5).bfloat16()
    targets = torch.randint(0, vocab, (24,))
    ref = _grads(_reference, hidden.float(), weight.float(), targets)
    loss, grad_h, grad_w = _grads(lambda h, w, t: linear_cross_entropy(h, w, t, 8), hidden, weight, targets)
    assert loss.dtype == torch.float32 and grad_h.dtype == grad_w.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad_h.float(), ref[1], rtol=5e-2, atol=1e-3)
    torch.testing.assert_close(grad_w.float(), ref[2], rtol=5e-2, atol=1e-3)


def test_no_counted_target_gives_nan_loss_and_zero_gradients_like_cross_entropy() -> None:
    hidden, weight = torch.randn(6, D), torch.randn(VOCAB, D)
    targets = torch.full((6,), -100)
    loss, grad_h, grad_w = _grads(lambda h, w, t: linear_cross_entropy(h, w, t, 4), hidden, weight, targets)
    ref_loss, ref_h, ref_w = _grads(_reference, hidden, weight, targets)
    assert torch.isnan(loss) and torch.isnan(ref_loss)
    assert torch.equal(grad_h, ref_h) and torch.equal(grad_w, ref_w) and not grad_w.any()


def test_without_grad_mode_only_the_loss_is_computed() -> None:
    hidden = torch.randn(2, 5, D, requires_grad=True)
    weight = torch.randn(VOCAB, D, requires_grad=True)
    targets = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, 3)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, _reference(hidden.reshape(-1, D), weight, targets.reshape(-1)).detach())


def test_gpt_chunked_loss_matches_the_full_logits_path_in_loss_and_every_gradient() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, context_length=16, n_layer=2, n_head=2, d_model=D))
    ids = torch.randint(0, VOCAB, (3, 16))
    targets = torch.randint(0, VOCAB, (3, 16))
    targets[:, :5] = -100

    def run(chunk_rows: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(ids, targets, loss_chunk_rows=chunk_rows)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    full, full_grads = run(None)
    chunked, chunked_grads = run(10)
    assert full.logits is not None and chunked.logits is None
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-5, atol=0)
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_chunk_rows_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(torch.randn(2, D), torch.randn(VOCAB, D), torch.zeros(2, dtype=torch.long), 0)
