"""Chunked linear cross-entropy against the plain path's full-logits loss: values and gradients."""

from __future__ import annotations

import pytest
import torch

from kotune.fast.loss import IGNORE, chunk_rows, linear_cross_entropy_sum, reference_cross_entropy_sum

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _case(batch, seq, dim, vocab, masked, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, dim, generator=g).to(device, dtype)
    weight = (torch.randn(vocab, dim, generator=g) / dim**0.5).to(device, dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < masked] = IGNORE
    return hidden, weight, labels.to(device)


def _loss_and_grad(fn, hidden, weight, labels, **kw):
    h = hidden.clone().requires_grad_(True)
    loss = fn(h, weight, labels, **kw)
    (loss * 0.37).backward()  # a non-unit upstream gradient
    return loss.detach(), h.grad


@pytest.mark.parametrize(
    ("batch", "seq", "dim", "vocab", "masked", "rows"),
    [
        (1, 2, 8, 5, 0.0, 1),  # shortest sequence, one row per chunk
        (2, 17, 16, 33, 0.3, 4),  # rows not a multiple of the chunk
        (3, 9, 8, 1000, 0.9, 1000),  # one chunk holds everything
        (1, 64, 32, 257, 0.5, None),  # default chunking
    ],
)
def test_matches_full_logits_loss_and_gradient(batch, seq, dim, vocab, masked, rows):
    hidden, weight, labels = _case(batch, seq, dim, vocab, masked, seed=seq + vocab)
    ref, ref_grad = _loss_and_grad(reference_cross_entropy_sum, hidden.double(), weight.double(), labels)
    got, got_grad = _loss_and_grad(linear_cross_entropy_sum, hidden, weight, labels, rows=rows)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_no_labelled_token_gives_zero_and_zero_gradient():
    hidden, weight, labels = _case(2, 5, 8, 11, 0.0, seed=1)
    labels[:] = IGNORE
    loss, grad = _loss_and_grad(linear_cross_entropy_sum, hidden, weight, labels)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_last_position_and_masked_positions_get_no_gradient():
    hidden, weight, labels = _case(1, 6, 8, 13, 0.0, seed=2)
    labels[0, 3] = IGNORE  # so position 2 predicts nothing
    _, grad = _loss_and_grad(linear_cross_entropy_sum, hidden, weight, labels)
    assert torch.count_nonzero(grad[0, 2]) == 0 and torch.count_nonzero(grad[0, -1]) == 0
    assert torch.count_nonzero(grad[0, 1]) > 0


def test_trainable_output_weight_is_refused():
    hidden, weight, labels = _case(1, 4, 8, 7, 0.0, seed=3)
    with pytest.raises(ValueError, match="frozen"):
        linear_cross_entropy_sum(hidden, weight.requires_grad_(True), labels)


def test_chunk_rows_bounds_logit_memory():
    assert chunk_rows(128_256) == 128
    assert chunk_rows(50_000) == 335 // 64 * 64
    assert chunk_rows(10) > 1_000_000


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("seq", "vocab"), [(2048, 128_256), (7, 32_000), (1, 50)])
def test_bf16_on_gpu_matches_fp32_reference(seq, vocab):
    hidden, weight, labels = _case(1, seq + 1, 256, vocab, 0.3, seed=seq, dtype=torch.bfloat16, device="cuda")
    ref, ref_grad = _loss_and_grad(reference_cross_entropy_sum, hidden.float(), weight.float(), labels)
    got, got_grad = _loss_and_grad(linear_cross_entropy_sum, hidden, weight, labels)
    assert torch.isfinite(got)
    assert abs(got.item() - ref.item()) <= 2e-3 * abs(ref.item()) + 1e-3
    rel = (got_grad.float() - ref_grad).norm() / ref_grad.norm().clamp(min=1e-12)
    assert rel < 1e-2


def _reference_sequence_logps(hidden, weight, labels, owner, n_sequences):
    """Full logits, fp64 log-softmax, summed per sequence (``owner``: the sequence of each predicted position)."""
    logp = torch.log_softmax((hidden[:, :-1] @ weight.T).double(), dim=-1)
    targets = labels[:, 1:]
    keep = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * keep
    sums = torch.zeros(n_sequences, dtype=torch.float64).index_add(0, owner.reshape(-1), picked.reshape(-1))
    return sums, torch.zeros(n_sequences, dtype=torch.long).index_add(0, owner.reshape(-1), keep.long().reshape(-1))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rows", [3, None])
def test_sequence_logps_match_full_logits_with_their_gradient(packed, rows):
    """Per-sequence sums (rows of a batch, or segments of one packed row) and the gradient of a weighted sum of
    them, as a DPO loss weighs chosen and rejected differently."""
    from kotune.fast.loss import linear_sequence_logps

    hidden, weight, labels = _case(3, 12, 16, 50, 0.4, seed=4)
    kwargs = {"rows": rows}
    if packed:  # the three rows end to end; each segment's first label is -100 (collate_packed)
        hidden, labels = hidden.reshape(1, 36, 16), labels.reshape(1, 36).clone()
        labels[0, [0, 12, 24]] = IGNORE
        kwargs["cu_seqlens"] = torch.tensor([0, 12, 24, 36], dtype=torch.int32)
        owner = (torch.arange(1, 36) // 12)[None]
    else:
        owner = torch.arange(3)[:, None].expand(3, 11)
    weights = torch.tensor([0.7, -1.3, 0.2], dtype=torch.float64)
    h = hidden.clone().requires_grad_(True)
    got, counts = linear_sequence_logps(h, weight, labels, **kwargs)
    (got.double() * weights).sum().backward()
    h_ref = hidden.clone().double().requires_grad_(True)
    want, want_counts = _reference_sequence_logps(h_ref, weight.double(), labels, owner, 3)
    (want * weights).sum().backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == want_counts.tolist() and min(counts.tolist()) > 0
    torch.testing.assert_close(h.grad.double(), h_ref.grad, rtol=1e-5, atol=1e-6)
