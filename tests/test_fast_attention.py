"""Attention over packed rows: rows never see each other; sliding windows as transformers defines them; the CUDA
varlen kernel matches the per-row reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kotune.data.packing import block_causal_mask
from kotune.fast.attention import (
    causal_attention,
    packed_attention,
    packed_attention_reference,
    repeat_kv,
    varlen_available,
    window_mask,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _qkv(total, heads=4, kv_heads=2, dim=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(1, h, total, dim, generator=g).to(device, dtype)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def test_block_causal_mask_by_hand():
    mask = block_causal_mask(torch.tensor([0, 2, 3, 5], dtype=torch.int32), 5).int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 0, 1, 0],
            [0, 0, 0, 1, 1],
        ]
    )
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("lengths", [[5], [3, 1, 6], [1, 1, 1, 1], [2, 9]])
def test_packed_reference_equals_masked_attention(lengths):
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    q, k, v = _qkv(bounds[-1], seed=len(lengths))
    mask = block_causal_mask(torch.tensor(bounds), bounds[-1])
    want = F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask)
    torch.testing.assert_close(packed_attention_reference(q, k, v, 2, bounds), want)


def test_rows_do_not_see_each_other():
    q, k, v = _qkv(8)
    bounds = [0, 3, 8]
    before = packed_attention_reference(q, k, v, 2, bounds)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :3] += 5.0  # change only the first row's keys and values
    v2[:, :, :3] -= 5.0
    after = packed_attention_reference(q, k2, v2, 2, bounds)
    torch.testing.assert_close(after[:, :, 3:], before[:, :, 3:])
    assert not torch.allclose(after[:, :, :3], before[:, :, :3])


def test_single_row_is_plain_causal_attention():
    q, k, v = _qkv(7)
    torch.testing.assert_close(packed_attention_reference(q, k, v, 2, [0, 7]), causal_attention(q, k, v, 2))


def test_cpu_uses_the_reference():
    assert not varlen_available(torch.device("cpu"))
    q, k, v = _qkv(6)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    torch.testing.assert_close(
        packed_attention(q, k, v, 2, cu, [0, 2, 6]), packed_attention_reference(q, k, v, 2, [0, 2, 6])
    )


def test_window_mask_by_hand():
    """A window of 2: each query sees itself and the key before it (transformers: kv_idx > q_idx - window)."""
    expected = torch.tensor(
        [
            [1, 0, 0, 0],
            [1, 1, 0, 0],
            [0, 1, 1, 0],
            [0, 0, 1, 1],
        ]
    )
    assert torch.equal(window_mask(4, 2, torch.device("cpu")).int(), expected)


def test_window_mask_is_transformers_sliding_window():
    from transformers.masking_utils import sliding_window_causal_mask_function

    rule = sliding_window_causal_mask_function(3)
    i, j = torch.arange(7)[:, None], torch.arange(7)[None, :]
    want = rule(0, 0, i, j)
    assert torch.equal(window_mask(7, 3, torch.device("cpu")), want)


@pytest.mark.parametrize("lengths", [[9], [3, 1, 8], [6, 6]])
def test_windowed_packed_reference_equals_masked_attention(lengths):
    """Windowed, scaled attention of packed rows = one masked SDPA call: block-diagonal, causal, last 3 keys."""
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    total = bounds[-1]
    q, k, v = _qkv(total, seed=7)
    mask = block_causal_mask(torch.tensor(bounds), total) & window_mask(total, 3, q.device)
    want = F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask, scale=0.3)
    torch.testing.assert_close(packed_attention_reference(q, k, v, 2, bounds, scale=0.3, window=3), want)


def test_a_window_as_long_as_the_rows_changes_nothing():
    q, k, v = _qkv(6)
    torch.testing.assert_close(causal_attention(q, k, v, 2, window=6), causal_attention(q, k, v, 2))
    assert not torch.allclose(causal_attention(q, k, v, 2, window=5), causal_attention(q, k, v, 2))
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    torch.testing.assert_close(
        packed_attention(q, k, v, 2, cu, [0, 2, 6], window=4), packed_attention(q, k, v, 2, cu, [0, 2, 6])
    )


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("lengths", [[2048], [700, 1, 300, 1047], [1, 1, 1], [4096, 13]])
@pytest.mark.parametrize(("scale", "window"), [(None, None), (None, 256), (0.0625, 1024)])
def test_varlen_on_gpu_matches_reference(lengths, scale, window):
    """The flash kernel's window_size=(W - 1, 0) is transformers' window of W keys, the current one included."""
    device = torch.device("cuda")
    assert varlen_available(device, scale, window), "torch.nn.attention.varlen is missing or lacks scale/window"
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    q, k, v = _qkv(bounds[-1], heads=32, kv_heads=8, dim=128, dtype=torch.bfloat16, device="cuda", seed=bounds[-1])
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    outs, grads = [], []
    for fn in (
        lambda a, b, c: packed_attention(a, b, c, 4, cu, bounds, scale, window),
        lambda a, b, c: packed_attention_reference(a.float(), b.float(), c.float(), 4, bounds, scale, window),
    ):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
        out.float().backward(upstream)
        outs.append(out.float())
        grads.append([t.grad.float() for t in leaves])
    for name, got, want in zip(["out", "dq", "dk", "dv"], [outs[0], *grads[0]], [outs[1], *grads[1]], strict=True):
        assert torch.isfinite(got).all(), name
        # one-token rows have exactly zero dq and dk: there the bound is absolute (bf16 rounding noise)
        error, bound = (got - want).norm(), 2e-2 * want.norm() + 1e-3 * got.numel() ** 0.5
        assert error <= bound, (name, error.item(), bound.item())


@pytest.mark.gpu
@cuda
def test_float32_packed_rows_on_gpu_take_the_reference():
    """The flash kernel computes in 16-bit only: a float32 model's packed rows (a float32 run on the fast path)
    go through the per-row reference instead of failing."""
    bounds = [0, 5, 12]
    q, k, v = _qkv(12, heads=4, kv_heads=2, dim=16, dtype=torch.float32, device="cuda", seed=0)
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    torch.testing.assert_close(packed_attention(q, k, v, 2, cu, bounds), packed_attention_reference(q, k, v, 2, bounds))
