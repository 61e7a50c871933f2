"""RMSNorm (Llama's, Gemma's), RoPE, SiLU- and GELU-gating: the plain forms against transformers, the fused
(liger) forms against those."""

from __future__ import annotations

import pytest
import torch

from kotune.fast.ops import (
    Ops,
    gelu_tanh_mul_reference,
    gemma_rms_norm_reference,
    liger_available,
    rms_norm_reference,
    rope_reference,
    silu_mul_reference,
)

needs_liger = pytest.mark.skipif(not liger_available(), reason="needs CUDA and liger-kernel")


def _rope_tables(batch, seq, dim, theta=10_000.0, positions=None):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=dim * 2, num_attention_heads=2, rope_theta=theta)
    rotary = LlamaRotaryEmbedding(config)
    positions = positions if positions is not None else torch.arange(seq)[None].expand(batch, -1)
    return rotary(torch.zeros(1, dtype=torch.float32), positions)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(48, eps=1e-5)
    torch.nn.init.normal_(norm.weight, mean=1.0, std=0.1)
    norm = norm.to(dtype)
    x = torch.randn(2, 7, 48, dtype=dtype) * 3
    torch.testing.assert_close(rms_norm_reference(x, norm.weight, 1e-5), norm(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_rms_norm_matches_transformers(dtype):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    norm = Gemma3RMSNorm(48, eps=1e-6)
    torch.nn.init.normal_(norm.weight, std=0.3)  # Gemma's weights are offsets from 1
    norm = norm.to(dtype)
    x = torch.randn(2, 7, 48, dtype=dtype) * 3
    torch.testing.assert_close(gemma_rms_norm_reference(x, norm.weight, 1e-6), norm(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_tanh_mul_matches_gemma_mlp(dtype):
    from transformers.activations import ACT2FN

    gate, up = torch.randn(3, 40, dtype=dtype) * 3, torch.randn(3, 40, dtype=dtype)
    want = ACT2FN["gelu_pytorch_tanh"](gate) * up
    torch.testing.assert_close(gelu_tanh_mul_reference(gate, up), want, rtol=0, atol=0)


def test_rope_matches_transformers_with_packed_positions():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cos, sin = _rope_tables(1, 9, 16, positions=positions)
    q, k = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16)
    for got, want in zip(rope_reference(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_plain_ops_are_used_without_cuda():
    ops = Ops(fused=True)
    x = torch.randn(3, 8)
    torch.testing.assert_close(ops.silu_mul(x, x + 1), silu_mul_reference(x, x + 1))
    assert ops.fused == liger_available()


def _compare(fused_fn, ref_fn, inputs, tol):
    """Outputs and input gradients of a fused op (bf16) against the plain op on fp32 copies."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    ref_leaves = [t.detach().float().requires_grad_(True) for t in inputs]
    out, ref = fused_fn(*leaves), ref_fn(*ref_leaves)
    out, ref = (out if isinstance(out, tuple) else (out,)), (ref if isinstance(ref, tuple) else (ref,))
    g = [torch.randn_like(r) for r in ref]
    torch.autograd.backward([o.float() for o in out], g)
    torch.autograd.backward(list(ref), g)
    pairs = [(o.float(), r) for o, r in zip(out, ref, strict=True)]
    pairs += [(a.grad.float(), b.grad) for a, b in zip(leaves, ref_leaves, strict=True) if b.grad is not None]
    for got, want in pairs:
        assert torch.isfinite(got).all()
        rel = (got - want).norm() / want.norm().clamp(min=1e-12)
        assert rel < tol, rel


@pytest.mark.gpu
@needs_liger
@pytest.mark.parametrize("rows", [1, 2048, 4099])
def test_fused_rms_norm_on_gpu(rows):
    ops = Ops(fused=True)
    x = torch.randn(1, rows, 4096, device="cuda", dtype=torch.bfloat16) * 2
    w = (1 + 0.1 * torch.randn(4096, device="cuda")).bfloat16()
    _compare(lambda a, b: ops.rms_norm(a, b, 1e-5), lambda a, b: rms_norm_reference(a, b, 1e-5), [x, w], 1e-2)


@pytest.mark.gpu
@needs_liger
@pytest.mark.parametrize("shape", [(1, 1, 1152), (1, 2048, 1152), (1, 4099, 8, 256)])  # last: q/k norm per head
def test_fused_gemma_rms_norm_on_gpu(shape):
    ops = Ops(fused=True)
    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 2
    w = (0.3 * torch.randn(shape[-1], device="cuda")).bfloat16()
    fused = lambda a, b: ops.gemma_rms_norm(a, b, 1e-6)  # noqa: E731
    _compare(fused, lambda a, b: gemma_rms_norm_reference(a, b, 1e-6), [x, w], 1e-2)


@pytest.mark.gpu
@needs_liger
@pytest.mark.parametrize(("batch", "seq"), [(1, 2048), (2, 33), (1, 1)])
def test_fused_rope_on_gpu(batch, seq):
    ops = Ops(fused=True)
    cos, sin = (t.cuda().bfloat16() for t in _rope_tables(batch, seq, 128, theta=500_000.0))
    # fused RoPE works in place on the [b, t, heads, d] storage, as the decoder lays it out
    q = torch.randn(batch, seq, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(batch, seq, 8, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    _compare(
        lambda a, b: ops.rope(a, b, cos, sin), lambda a, b: rope_reference(a, b, cos.float(), sin.float()), [q, k], 1e-2
    )


@pytest.mark.gpu
@needs_liger
@pytest.mark.parametrize("rows", [1, 2048])
@pytest.mark.parametrize(
    ("gate_op", "reference", "width"),
    [("silu_mul", silu_mul_reference, 14336), ("gelu_tanh_mul", gelu_tanh_mul_reference, 6912)],
)
def test_fused_gated_mlp_on_gpu(rows, gate_op, reference, width):
    gate = torch.randn(1, rows, width, device="cuda", dtype=torch.bfloat16) * 3
    up = torch.randn(1, rows, width, device="cuda", dtype=torch.bfloat16)
    _compare(getattr(Ops(fused=True), gate_op), reference, [gate, up], 1e-2)
