"""The fast training forward against the plain transformers + peft forward: loss and every LoRA gradient.

CPU, fp32, tiny random models of each supported architecture; the GPU test repeats it in bf16 on a 4-bit model.
"""

from __future__ import annotations

import pytest
import torch

from kotune.data.batching import collate, collate_packed
from kotune.data.examples import IGNORE, Example
from kotune.fast.llama import FastCausalLM, unsupported_reason
from kotune.training.build import loss_sum

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
VOCAB = 300


def _config(kind: str):
    from transformers import AutoConfig

    extra = {"qwen2": {"use_sliding_window": False}, "mistral": {"sliding_window": None}}.get(kind, {})
    return AutoConfig.for_model(
        kind,
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=kind == "qwen2",
        attn_implementation="sdpa",
        **extra,
    )


def _peft_model(kind="llama", targets="all-linear", dropout=0.0, seed=0, model=None):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = model if model is not None else AutoModelForCausalLM.from_config(_config(kind))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # non-zero B so every LoRA gradient is exercised
            torch.nn.init.normal_(p, std=0.1)
    return peft_model.train()


def _rows(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        labels = [IGNORE] * (n // 3) + ids[n // 3 :]
        rows.append(Example(i, ids, labels))
    return rows


def _loss_and_grads(model, params, fn, batch, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    loss = fn(model, batch)
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


def _fast(model, checkpoint=True):
    return FastCausalLM(model, torch.float32, checkpoint=checkpoint, offload=False, fused=False).train()


def _fast_loss(fast, batch):
    return fast(batch["input_ids"], batch["labels"], batch.get("position_ids"), batch.get("cu_seqlens"))


def _assert_same(a, b, rtol=1e-4, atol=1e-6):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "k_proj", "v_proj", "o_proj"]])
@pytest.mark.parametrize("checkpoint", [True, False])
def test_padded_batch_matches_plain_forward(kind, targets, checkpoint):
    model = _peft_model(kind, targets)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = collate(_rows([13, 6, 9]), pad_id=0, pad_to_multiple_of=8)
    plain = _loss_and_grads(model, params, loss_sum, batch)
    fast = _loss_and_grads(_fast(model, checkpoint), params, _fast_loss, batch)
    _assert_same(fast, plain)


def test_packed_rows_equal_the_rows_one_by_one():
    model = _peft_model()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = _rows([7, 1 + 1, 12, 5], seed=3)
    one_by_one = [_loss_and_grads(model, params, loss_sum, collate([r], 0)) for r in rows]
    want = (sum(x[0] for x in one_by_one), [sum(g) for g in zip(*(x[1] for x in one_by_one), strict=True)])
    packed = collate_packed(rows)
    _assert_same(_loss_and_grads(_fast(model), params, _fast_loss, packed), want)
    _assert_same(_loss_and_grads(model, params, loss_sum, packed), want)  # the plain path's packed mask


def test_dropout_masks_are_replayed_by_checkpointing():
    model = _peft_model(dropout=0.2)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = collate(_rows([11, 8]), pad_id=0)
    plain = _loss_and_grads(model, params, loss_sum, batch, seed=5)  # peft draws the same masks in the same order
    _assert_same(_loss_and_grads(_fast(model, checkpoint=True), params, _fast_loss, batch, seed=5), plain)
    _assert_same(_loss_and_grads(_fast(model, checkpoint=False), params, _fast_loss, batch, seed=5), plain)


def test_eval_mode_and_no_grad_give_the_eval_loss():
    model = _peft_model(dropout=0.3)
    batch = collate(_rows([10, 4]), pad_id=0)
    fast = _fast(model)
    fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(_fast_loss(fast, batch), loss_sum(model, batch))


def test_four_bit_model_on_cpu_matches_plain_forward(tmp_path):
    from transformers import AutoModelForCausalLM

    from kotune.model.load import nf4_config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config("llama")).save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=nf4_config(torch.float32), device_map={"": "cpu"}
    )
    assert getattr(base.model.layers[0].mlp.up_proj.weight, "quant_state", None) is not None
    model = _peft_model(targets=["q_proj", "v_proj"], model=base)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = collate(_rows([9, 14]), pad_id=0)
    _assert_same(
        _loss_and_grads(_fast(model), params, _fast_loss, batch), _loss_and_grads(model, params, loss_sum, batch)
    )


def test_unsupported_models_are_named():
    from transformers import AutoConfig

    assert unsupported_reason(_config("llama"), "all-linear") is None
    assert "gpt2" in unsupported_reason(AutoConfig.for_model("gpt2"), "all-linear")
    assert "sliding" in unsupported_reason(AutoConfig.for_model("mistral", sliding_window=4096), ["q_proj"])
    assert "lm_head" in unsupported_reason(_config("llama"), ["q_proj", "lm_head"])
    gelu = _config("llama")
    gelu.hidden_act = "gelu"
    assert "gelu" in unsupported_reason(gelu, ["q_proj"])


def _four_bit_models(tmp_path):
    """Two LoRA models on one bf16 4-bit base (GPU): the plain path's (prepared, fp32 copies) and the fast path's."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from kotune.model.load import nf4_config

    config = _config("llama")
    config.update({"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 2})
    config.vocab_size = 32_000
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path)
    quant = nf4_config(torch.bfloat16)
    load = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        tmp_path, quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0}
    )
    plain_model = _peft_model(model=prepare_model_for_kbit_training(load(), use_gradient_checkpointing=False))
    return plain_model, _peft_model(model=load())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("offload", [True, False])
def test_bf16_four_bit_on_gpu_matches_plain_forward(tmp_path, offload):
    """The plain path as the walkthrough runs it (fp32 copies, autocast) against the fast path in bf16.

    ``offload`` switches every memory lever together: layer inputs and the embedding table in host memory.
    """
    plain_model, fast_model = _four_bit_models(tmp_path)
    rows = _rows([300, 77, 512], seed=9)
    batch = {k: v.cuda() for k, v in collate(rows, pad_id=0, pad_to_multiple_of=8).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain_params = [p for p in plain_model.parameters() if p.requires_grad]
        want = _loss_and_grads(plain_model, plain_params, loss_sum, batch)
    fast = FastCausalLM(
        fast_model, torch.bfloat16, checkpoint=True, offload=offload, fused=True, host_embeddings=offload
    ).train()
    fast_params = [p for p in fast_model.parameters() if p.requires_grad]
    got = _loss_and_grads(fast, fast_params, _fast_loss, batch)
    assert abs(got[0].item() - want[0].item()) <= 5e-3 * abs(want[0].item())
    for g, w in zip(got[1], want[1], strict=True):
        rel = (g.float() - w.float()).norm() / w.float().norm().clamp(min=1e-12)
        assert rel < 5e-2, rel


@pytest.mark.parametrize("packed", [False, True])
def test_host_side_inputs_give_the_same_loss_and_gradients(packed):
    """The training step hands the fast forward what it reads on the host (ids, row bounds, labelled positions)
    so it never reads the device back; the result is the one it computes by reading them itself."""
    from kotune.fast import HostSide, with_host_side
    from kotune.fast import loss_sum as fast_loss_sum

    model = _peft_model()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = _rows([7, 3, 12, 5], seed=4)
    batch = collate_packed(rows) if packed else collate(rows, pad_id=0, pad_to_multiple_of=8)
    host = HostSide(batch)
    assert torch.equal(host.keep, (batch["labels"][:, 1:].reshape(-1) != -100).nonzero().squeeze(1))
    assert host.bounds == (batch["cu_seqlens"].tolist() if packed else None)
    fast = _fast(model)
    _assert_same(
        _loss_and_grads(fast, params, fast_loss_sum, with_host_side(batch)),
        _loss_and_grads(fast, params, _fast_loss, batch),
        rtol=0,
        atol=0,
    )


@pytest.mark.gpu
@cuda
def test_bf16_four_bit_dpo_on_gpu_matches_the_plain_path(tmp_path):
    """DPO on the fast path (pairs packed into one row, log-probs by the chunked kernel, reference with LoRA B
    zeroed) against the plain path (padded pairs, full logits, peft's adapter switch), bf16 on a 4-bit base."""
    from kotune.data.preference import PreferencePair, collate_pairs
    from kotune.preference_config import PreferenceConfig
    from kotune.training.objectives import preference_step

    plain_model, fast_model = _four_bit_models(tmp_path)
    g = torch.Generator().manual_seed(11)
    ids = lambda n: torch.randint(0, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    pairs = [PreferencePair(i, ids(p), ids(c), ids(r)) for i, (p, c, r) in enumerate([(40, 120, 60), (200, 30, 90)])]
    settings = PreferenceConfig(beta=0.1)

    def run(model, batch, **kw):
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, metrics = preference_step(model, {k: v.cuda() for k, v in batch.items()}, "dpo", settings, **kw)
        return loss.item(), {k: v.item() for k, v in metrics.items()}, torch.autograd.grad(loss, params)

    want = run(plain_model, collate_pairs(pairs, 0))
    fast = FastCausalLM(fast_model, torch.bfloat16, checkpoint=True, offload=True, fused=True).train()
    got = run(fast_model, collate_pairs(pairs, 0, packed=True), forward=fast)
    assert got[0] == pytest.approx(want[0], abs=2e-2)
    for key in ("logps_chosen", "logps_rejected"):
        assert got[1][key] == pytest.approx(want[1][key], rel=1e-2), key
    for a, b in zip(got[2], want[2], strict=True):
        rel = (a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)
        assert rel < 5e-2, rel
