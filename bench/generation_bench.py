"""Greedy generation on one GPU: kotune's fast generator (``kotune.fast.generation``: the training path's layers,
a static KV cache, decode steps replayed as a CUDA graph) against transformers' ``generate`` on the same model.

    python bench/generation_bench.py

The model is the anchor's (Llama-3-8B shape, random bf16 weights, NF4 with double quantization, bf16 compute) with
a LoRA adapter r16 on q,k,v,o whose B matrices are random (so the adapter changes the replies), unmerged, as
``kotune chat`` / ``generate`` / ``eval`` and GRPO's rollouts hold it. Two batches: 64 prompts of 96 tokens (a GRPO
step's 8 x 8) and 1 prompt (chat). Each tool generates ``NEW`` tokens a row with no stop token (random weights
rarely reach EOS; both tools are told to ignore it), once to warm up and once timed. Prints RESULT with tokens/s
(generated tokens over the timed call's wall time, prefill included), peak allocated memory, and how many rows'
replies are identical to transformers' token for token (bf16: a near tie can flip the argmax and the reply
diverges from there; the first diverging position is printed). So the batch of 64 is also compared token by token
on transformers' own replies (teacher-forced): kotune's logits at each step against those transformers' ``generate``
chose by, and, as the yardstick of bf16 noise, transformers' one-pass forward over the same tokens against them too:
mean |delta logit|, top-1 agreement, and top-1 agreement where transformers' top token leads by more than each of LEADS.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QKVO, anchor, emit, gpu_name  # noqa: E402

MODEL = "/tmp/llama3-8b-rand"
PROMPT_TOKENS, NEW = 96, 128
LEADS = (0.05, 0.25, 1.0)


def load():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kotune.model.load import nf4_config

    model = AutoModelForCausalLM.from_pretrained(
        MODEL, quantization_config=nf4_config(torch.bfloat16), dtype=torch.bfloat16, device_map={"": 0}
    )
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=QKVO))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def prompts(n: int) -> list[list[int]]:
    rng = random.Random(n)
    return [[rng.randrange(1000, 128000) for _ in range(PROMPT_TOKENS)] for _ in range(n)]


def greedy(model, ids, mask, **extra):
    """transformers' ``generate``: greedy, exactly NEW tokens a row (EOS ignored), ``extra`` passed on."""
    import torch

    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                              min_new_tokens=NEW, pad_token_id=0, **extra)  # fmt: skip


def transformers_generate(model, rows: list[list[int]]) -> list[list[int]]:
    from kotune.inference.generate import left_pad

    ids, mask = left_pad(rows, 0, "cuda")
    return greedy(model, ids, mask)[:, ids.shape[1] :].tolist()


def kotune_generate(model, rows: list[list[int]]) -> list[list[int]]:
    from kotune.inference.generate import Sampling, generate

    return [g.ids for g in generate(model, rows, 0, [], Sampling(max_new_tokens=NEW))]


def timed(fn, model, rows) -> tuple[list[list[int]], float, float]:
    import torch

    fn(model, rows)  # warm-up: kernels compile, the graph is recorded once
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn(model, rows)
    torch.cuda.synchronize()
    return out, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def agreement(model, rows: list[list[int]]) -> dict:
    """Teacher-forced on transformers' greedy replies: kotune's step logits and transformers' one-pass logits,
    each against the logits transformers' ``generate`` picked its tokens by."""
    import torch

    from kotune.fast.generation import fast_generator
    from kotune.inference.generate import left_pad

    ids, mask = left_pad(rows, 0, "cuda")
    with torch.no_grad():
        out = greedy(model, ids, mask, output_logits=True, return_dict_in_generate=True)
        reply = out.sequences[:, ids.shape[1] :]
        picked = torch.stack(out.logits, 1).float()  # [batch, NEW, vocab]
        fast = fast_generator(model)
        steps = [fast.start(ids, mask, NEW).clone()]
        going = torch.ones(len(rows), dtype=torch.bool, device="cuda")
        steps += [fast.step(reply[:, i], going).clone() for i in range(NEW - 1)]
        fast.release()
        kotune = torch.stack(steps, 1)
        whole = torch.cat([ids, reply[:, :-1]], 1)
        one_pass = torch.cat([model(input_ids=whole[i : i + 8], logits_to_keep=NEW).logits.float()
                              for i in range(0, len(rows), 8)])  # fmt: skip
    top2 = picked.topk(2, -1).values
    lead = top2[..., 0] - top2[..., 1]
    record = {}
    for name, got in (("kotune_steps", kotune), ("transformers_one_pass", one_pass)):
        right = got.argmax(-1) == reply
        record[name] = {"mean_abs_delta": round((got - picked).abs().mean().item(), 5),
                        "top1": round(right.float().mean().item(), 4)}  # fmt: skip
        record[name] |= {f"top1_where_lead>{x}": round(right[lead > x].float().mean().item(), 4) for x in LEADS}
    return record | {"positions": reply.numel()} | {f"positions_lead>{x}": int((lead > x).sum()) for x in LEADS}


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def main() -> None:
    from kotune.fast.generation import fast_generator

    anchor().build_model_dir(MODEL, 32)
    model = load()
    assert fast_generator(model) is not None, "the fast generator does not apply to the bench model"
    for batch in (64, 1):
        rows = prompts(batch)
        want, t_hf, mem_hf = timed(transformers_generate, model, rows)
        got, t_fast, mem_fast = timed(kotune_generate, model, rows)
        diffs = [first_difference(g, w) for g, w in zip(got, want, strict=True)]
        tokens = batch * NEW
        emit({
            "bench": "generation", "gpu": gpu_name(), "batch": batch, "prompt_tokens": PROMPT_TOKENS, "new": NEW,
            "transformers_tokens_per_s": round(tokens / t_hf, 1), "kotune_tokens_per_s": round(tokens / t_fast, 1),
            "speedup": round(t_hf / t_fast, 2), "transformers_peak_gib": round(mem_hf, 2),
            "kotune_peak_gib": round(mem_fast, 2), "identical_rows": sum(d is None for d in diffs),
            "first_differences": sorted(d for d in diffs if d is not None)[:16],
            "lengths": sorted({len(g) for g in got}),
            **({"teacher_forced": agreement(model, rows)} if batch > 1 else {}),
        })  # fmt: skip


if __name__ == "__main__":
    main()
