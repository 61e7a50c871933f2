"""The fused frozen-linear + LoRA function against peft's own layer: outputs and every gradient."""

from __future__ import annotations

import pytest
import torch

from kotune.fast.lora import UnsupportedModule, project, read_projection, reference_project

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Block(torch.nn.Module):
    def __init__(self, dim_in, dim_out, bias):
        super().__init__()
        self.lin = torch.nn.Linear(dim_in, dim_out, bias=bias)
        self.other = torch.nn.Linear(dim_in, dim_out, bias=False)

    def forward(self, x):
        return self.lin(x) + self.other(x)


def _peft_block(dim_in=24, dim_out=40, bias=True, dropout=0.0, r=4, alpha=8, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(
        Block(dim_in, dim_out, bias), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["lin"])
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a non-zero B exercises every gradient
            torch.nn.init.normal_(p, std=0.2)
    return model.train()


def _grads(fn, x, params):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, [x, *params], upstream)
    return out.detach(), grads


@pytest.mark.parametrize("shape", [(1, 24), (3, 5, 24), (2, 1, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_peft_layer(shape, bias):
    model = _peft_block(bias=bias)
    layer = model.base_model.model.lin
    proj = read_projection(layer)
    x = torch.randn(shape)
    params = [proj.lora_a, proj.lora_b]
    ref_out, ref_grads = _grads(layer, x, params)
    out, grads = _grads(lambda t: project(t, proj, training=True), x, params)
    torch.testing.assert_close(out, ref_out)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_dropout_draws_peft_masks_and_differentiates_through_them():
    model = _peft_block(dropout=0.3)
    layer = model.base_model.model.lin
    proj = read_projection(layer)
    assert proj.dropout == pytest.approx(0.3)
    x = torch.randn(4, 6, 24)
    params = [proj.lora_a, proj.lora_b]
    torch.manual_seed(11)
    ref_out, ref_grads = _grads(layer, x, params)
    torch.manual_seed(11)
    out, grads = _grads(lambda t: project(t, proj, training=True), x, params)
    torch.testing.assert_close(out, ref_out)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_eval_mode_skips_dropout():
    model = _peft_block(dropout=0.5)
    proj = read_projection(model.base_model.model.lin)
    x = torch.randn(3, 24)
    torch.testing.assert_close(project(x, proj, training=False), project(x, proj, training=False))
    torch.testing.assert_close(project(x, proj, training=False), reference_project(x, proj, training=False))


def test_bare_linear_has_no_lora_and_input_gradient_only():
    model = _peft_block()
    proj = read_projection(model.base_model.model.other)
    assert proj.lora_a is None and proj.trainable() == []
    x = torch.randn(2, 3, 24, requires_grad=True)
    out = project(x, proj, training=True)
    (gx,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(gx, torch.ones(2, 3, 40) @ model.base_model.model.other.weight)


def test_input_without_grad_still_trains_lora():
    model = _peft_block()
    proj = read_projection(model.base_model.model.lin)
    out = project(torch.randn(5, 24), proj, training=True)
    ga, gb = torch.autograd.grad(out.square().sum(), [proj.lora_a, proj.lora_b])
    assert ga.abs().sum() > 0 and gb.abs().sum() > 0


def test_merged_adapter_is_refused():
    model = _peft_block()
    layer = model.base_model.model.lin
    layer.merge()
    with pytest.raises(UnsupportedModule, match="unmerged"):
        read_projection(layer)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("rows", "dim_in", "dim_out"), [(2048, 512, 1536), (1, 64, 64), (37, 256, 96)])
def test_nf4_bf16_on_gpu_matches_fp32_reference(rows, dim_in, dim_out):
    """4-bit base on the GPU: the fused function against plain autograd on the same dequantized weight in fp32."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(rows)
    block = Block(dim_in, dim_out, bias=False)
    quantized = bnb.nn.Linear4bit(dim_in, dim_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    quantized.weight = bnb.nn.Params4bit(block.lin.weight.data.bfloat16(), requires_grad=False, quant_type="nf4")
    block.lin = quantized
    model = get_peft_model(block.cuda(), LoraConfig(r=16, lora_alpha=16, target_modules=["lin"])).train()
    proj = read_projection(model.base_model.model.lin)
    torch.nn.init.normal_(proj.lora_b, std=0.05)
    x = torch.randn(rows, dim_in, device="cuda", dtype=torch.bfloat16)
    params = [proj.lora_a, proj.lora_b]
    out, grads = _grads(lambda t: project(t, proj, training=True), x, params)
    ref_out, ref_grads = _grads(lambda t: reference_project(t, proj, training=True), x.float(), params)
    for got, want in zip([out, *grads], [ref_out, *ref_grads], strict=True):
        assert torch.isfinite(got).all()
        rel = (got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12)
        assert rel < 2e-2, rel
