"""Loading a 4-bit base: bitsandbytes' CPU inference repacking is turned off, so evaluation leaves the weights
(and with them every later training step and the merge's reference) exactly as they were."""

from __future__ import annotations

import pytest
import torch

from kotune.model.load import nf4_config


def first_4bit_layer(model):
    import bitsandbytes as bnb

    return next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def load_nf4(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=nf4_config(torch.float32), dtype=torch.float32
    )


IDS = torch.tensor([[1, 5, 9, 200, 3000, 17, 42, 7]])


@pytest.mark.compat("bitsandbytes", "transformers", "accelerate")
def test_bitsandbytes_still_repacks_4bit_weights_in_eval_mode(tiny_llama3_model):
    """The hazard ``keep_4bit_weights_exact`` guards against. When this test fails, bitsandbytes no longer
    repacks (or renamed its switch): check, then drop the workaround."""
    model = load_nf4(tiny_llama3_model).eval()
    layer = first_4bit_layer(model)
    assert hasattr(layer, "support_avx512bf16_for_cpu")
    if not layer.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16, where bitsandbytes never repacks")
    absmax_dtype = layer.weight.quant_state.absmax.dtype
    with torch.no_grad():
        model(input_ids=IDS)
    state = layer.weight.quant_state
    assert getattr(state, "packing_format_for_cpu", False)
    assert state.dtype == torch.bfloat16 and state.absmax.dtype != absmax_dtype


@pytest.mark.compat("bitsandbytes", "transformers", "accelerate")
def test_evaluation_leaves_4bit_weights_and_training_outputs_unchanged(tiny_llama3_model):
    from kotune.config import ModelConfig
    from kotune.model.load import load_base_model

    cfg = ModelConfig(path=tiny_llama3_model, compute_dtype="float32", gradient_checkpointing=False)
    model = load_base_model(tiny_llama3_model, cfg)
    layer = first_4bit_layer(model)
    weight = layer.weight.data.clone()
    absmax = layer.weight.quant_state.absmax.clone()
    model.train()
    before = model(input_ids=IDS).logits.detach()
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)
    model.train()
    after = model(input_ids=IDS).logits.detach()
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(layer.weight.data, weight) and torch.equal(layer.weight.quant_state.absmax, absmax)
    assert torch.equal(before, after)
