"""Model loading: 4-bit weights stay exactly as quantized whatever mode the model runs in."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")


def quantized_layer(seed: int = 0):
    """A 4-bit NF4 layer (double-quantized, as kotune loads them) on the CPU, in eval mode."""
    torch.manual_seed(seed)
    dense = torch.nn.Linear(128, 64, bias=False)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True)
    layer = layer.to("cpu")
    return layer.eval()


def stored(layer) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.weight.data.clone(), layer.weight.quant_state.absmax.clone()


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks only on AVX512-BF16 CPUs")
def test_bitsandbytes_still_repacks_4bit_weights_in_eval():
    # The reason for kotune.model.keep_4bit_weights_as_quantized: when this fails, bitsandbytes no longer
    # rewrites the weights in an eval forward and the workaround can go.
    layer = quantized_layer()
    before = stored(layer)
    with torch.no_grad():
        layer(torch.randn(2, 128))
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    after = stored(layer)
    assert after[0].shape != before[0].shape or not torch.equal(after[0], before[0])


def test_an_eval_forward_leaves_the_4bit_weights_as_quantized():
    from kotune.model import keep_4bit_weights_as_quantized

    layer = quantized_layer()
    assert keep_4bit_weights_as_quantized(layer) == 1
    before = stored(layer)
    x = torch.randn(2, 128)
    with torch.no_grad():
        first = layer(x)
        second = layer(x)
    after = stored(layer)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    with torch.no_grad():
        trained_mode = layer.train()(x)
    torch.testing.assert_close(first, trained_mode, rtol=0, atol=0)
