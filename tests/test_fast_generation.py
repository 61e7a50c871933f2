"""``kotune.fast.generation`` against transformers' own forward and cache (``ModelSteps``): the same next-token
logits after the prefill and at every decode step, rows stopping mid-way included, so the same greedy replies.

CPU: fp32, tiny random models of the families with the most to get wrong (windows shorter than the prompts, q/k
norms, Gemma 3's local and global layers and scales, EXAONE 4's layers without RoPE), left-padded prompts of
different lengths. GPU: bf16 on a 4-bit model, the decode step replayed as a CUDA graph against the same steps run
eagerly, and against transformers.
"""

from __future__ import annotations

import pytest
import torch
from test_fast_model import _config, _four_bit_models, _peft_model, cuda

from kotune.fast import generation
from kotune.fast.decoder import FastCausalLM
from kotune.fast.generation import FastGenerator, unusable_reason
from kotune.inference import generate as inference
from kotune.inference.generate import ModelSteps, Sampling, left_pad

PROMPTS = [[5, 17, 9, 33, 2, 41, 8, 19, 3], [7, 11, 250], [60, 61, 62, 63, 64, 65]]
NEW = 8
STOPPED = (1, 2)
"""Row 1 stops after decode step 2: from then on its tokens are masked out (its logits are nobody's concern)."""


def _logits(steps, prompts, device="cpu"):
    """Greedy decoding's logits per step, and which rows were going at each; the tokens fed are argmaxes."""
    ids, mask = left_pad(prompts, 0, device)
    out = [steps.start(ids, mask, NEW).clone()]
    going = torch.ones(len(prompts), dtype=torch.bool, device=device)
    live = [going.clone()]
    for step in range(NEW - 1):
        token = out[-1].argmax(-1)
        if step == STOPPED[1]:
            going[STOPPED[0]] = False
        out.append(steps.step(token, going.clone()).clone())
        live.append(going.clone())
    steps.release()
    return out, live


def _assert_same_logits(got, want, rtol, atol):
    (got_logits, live), (want_logits, _) = got, want
    assert len(got_logits) == len(want_logits) == NEW
    for g, w, rows in zip(got_logits, want_logits, live, strict=True):
        torch.testing.assert_close(g[rows], w[rows], rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", ["llama", "mistral-window", "qwen3-window", "gemma3_text", "gemma3", "exaone4"])
def test_prefill_and_decode_steps_give_transformers_logits(kind, monkeypatch):
    model = _peft_model(kind).eval()
    monkeypatch.setattr(generation, "PREFILL_TOKENS", 12)  # the prompts go into the cache a row or two at a time
    with torch.no_grad():
        want = _logits(ModelSteps(model), PROMPTS)
        got = _logits(FastGenerator(model, graphs=False), PROMPTS)
    _assert_same_logits(got, want, rtol=1e-4, atol=1e-4)


def test_generate_replies_equal_through_either_steps(monkeypatch):
    """``inference.generate`` (what chat, generate and eval call) keeps stopped rows in the fast generator's batch
    where transformers' steps drop them: the replies and their stops are the same."""
    model = _peft_model("qwen3-window").eval()
    sampling = Sampling(max_new_tokens=12)
    want = inference.generate(model, PROMPTS, 0, [], sampling)
    stop = want[0].ids[3]  # a token row 0 produces mid-way: rows stop at different steps
    want = inference.generate(model, PROMPTS, 0, [stop], sampling)
    monkeypatch.setattr(generation, "fast_generator", lambda m: FastGenerator(m, graphs=False))
    got = inference.generate(model, PROMPTS, 0, [stop], sampling)
    assert got == want
    assert any(g.stopped for g in got) and not all(g.stopped for g in got)


def test_only_models_the_fast_path_computes_exactly_get_the_generator():
    from transformers import AutoConfig, AutoModelForCausalLM

    assert unusable_reason(_peft_model("llama")) is None
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2))
    assert "gpt2" in unusable_reason(gpt2)
    softcapped = _config("gemma3_text")
    softcapped.final_logit_softcapping = 30.0
    assert "softcapping" in unusable_reason(AutoModelForCausalLM.from_config(softcapped))
    assert generation.fast_generator(_peft_model("llama")) is None  # on the CPU: transformers' steps


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind", ["llama", "qwen3-window", "gemma3_text"])
def test_bf16_four_bit_graph_replays_equal_eager_steps_and_follow_transformers(tmp_path, kind):
    """A recorded decode step replays exactly what the eager step computes (the same kernels); both stay within
    bf16 rounding of transformers' forward on the same 4-bit model and adapter; with the embedding table in host
    memory (GRPO's training fast path puts it there) the steps compute the same."""
    _, model = _four_bit_models(tmp_path, kind)
    model.eval()
    with torch.no_grad():
        want = _logits(ModelSteps(model), PROMPTS, "cuda")
        eager = _logits(FastGenerator(model, graphs=False), PROMPTS, "cuda")
        replayed = _logits(FastGenerator(model, graphs=True), PROMPTS, "cuda")
    _assert_same_logits(replayed, eager, rtol=0, atol=0)
    scale = max(w.abs().max().item() for w in want[0])
    _assert_same_logits(eager, want, rtol=0, atol=0.05 * scale)
    # GRPO's training fast path moves an untied embedding table to host memory: the generator reads it there
    FastCausalLM(model, torch.bfloat16, checkpoint=True, offload=True, fused=True, host_embeddings=True)
    if kind != "qwen3-window":  # qwen3's test model ties its embeddings: the table stays on the GPU
        assert not model.get_input_embeddings().weight.is_cuda
    with torch.no_grad():
        host = _logits(FastGenerator(model), PROMPTS, "cuda")
    _assert_same_logits(host, eager, rtol=0, atol=1e-3 * scale)
