"""The one-launch NF4 dequantization against bitsandbytes' own, on the GPU: the same numbers, bit for bit."""

from __future__ import annotations

import pytest
import torch

from kotune.fast import nf4

needs_triton = pytest.mark.skipif(not nf4.available(), reason="needs CUDA and Triton")


def _quantized(rows: int, cols: int, nested: bool, storage: torch.dtype, seed: int):
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=torch.bfloat16, quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(
        torch.randn(rows, cols) * 0.02,
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=nested,
        quant_storage=storage,
    )
    return layer.cuda().weight


def test_cpu_falls_back_to_bitsandbytes():
    if torch.cuda.is_available():
        pytest.skip("only meaningful without CUDA")
    assert not nf4.available()


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.uint8])
@pytest.mark.parametrize(("rows", "cols"), [(4096, 4096), (14336, 4096), (1024, 4096), (96, 128), (3, 64)])
def test_matches_bitsandbytes_exactly(nested, storage, rows, cols):
    import bitsandbytes.functional as F

    weight = _quantized(rows, cols, nested, storage, seed=rows + cols)
    ours = nf4.NF4Weight.of(weight)
    for dtype in (torch.bfloat16, torch.float32):
        weight.quant_state.dtype = dtype
        want = F.dequantize_4bit(weight.data, weight.quant_state)
        got = torch.full_like(want, float("nan"))  # poisoned: every element must be written
        ours.dequantize(dtype, out=got)
        assert got.shape == want.shape and got.dtype == want.dtype
        mismatched = (got != want).sum().item()
        assert mismatched == 0, f"{mismatched} of {want.numel()} elements differ ({dtype})"
