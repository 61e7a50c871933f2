"""GRPO steps on one GPU: kotune (`kotune train`, objective grpo) against TRL's GRPOTrainer, same prompts and shapes.

    python bench/grpo_bench.py --tool kotune      # kotune's CLI, as a user runs it
    python bench/grpo_bench.py --tool trl         # TRL's GRPOTrainer, bitsandbytes NF4 base, transformers' generate

The model is the anchor's (Llama-3-8B shape, random bf16 weights, NF4; word-level tokenizer, ``t<id>`` is token id),
LoRA r16 / alpha 16 on q,k,v,o, dropout 0, 8-bit paged AdamW, gradient checkpointing. A step: 8 prompts of 96
tokens, 8 completions each (64 sequences generated together), up to 128 new tokens at temperature 1, DAPO's token
loss, beta 0 (no reference pass), one reward that is always 0 (random weights solve nothing; the computation does not
depend on the values). Random weights rarely sample EOS, so completions run to 128 tokens in both tools.
Prints RESULT with seconds per step, the share of it spent generating, rollout tokens/s (completion tokens over
generation time), training tokens/s (prompt + completion tokens over the rest of the step) and peak allocated memory,
over the steps after the first (warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QKVO, anchor, emit, gpu_name  # noqa: E402

MODEL = "/tmp/llama3-8b-rand"
PROMPTS, PROMPT_TOKENS, GENERATIONS, NEW_TOKENS, STEPS = 8, 96, 8, 128, 4


def prompt_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    return [{"prompt": " ".join(f"t{rng.randrange(1000, 128000)}" for _ in range(PROMPT_TOKENS)), "answer": "7"}
            for _ in range(n)]  # fmt: skip


def zero_reward(completions, **_) -> list[float]:
    return [0.0] * len(completions)


def run_kotune(out: Path, overrides: list[str]) -> dict:
    data = out / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(PROMPTS * STEPS)))
    (out / "rewards.py").write_text("def zero(completion, row):\n    return 0.0\n")
    cfg = out / "grpo.yaml"
    cfg.write_text(f"""model:
  path: {MODEL}
data:
  path: {data}
  val_size: 0
  cutoff_len: {PROMPT_TOKENS + NEW_TOKENS + 8}
lora: {{r: 16, alpha: 16, dropout: 0.0, target_modules: [{", ".join(QKVO)}]}}
train:
  objective: grpo
  output_dir: {out / "run"}
  micro_batch_size: {PROMPTS}
  gradient_accumulation_steps: 1
  max_steps: {STEPS}
  learning_rate: 1e-5
  warmup_steps: 0
  optimizer: paged_adamw_8bit
  logging_steps: 1
  save_steps: 1000
grpo:
  generations: {GENERATIONS}
  max_new_tokens: {NEW_TOKENS}
  loss_type: dapo
  rewards: {{"{out / "rewards.py"}:zero": 1.0}}
""")
    command = [sys.executable, "-m", "kotune.cli", "train", str(cfg), *overrides]
    proc = subprocess.run(command, capture_output=True, text=True)
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    metrics = out / "run" / "metrics.jsonl"
    if proc.returncode or not metrics.exists():
        return {"error": (proc.stdout + proc.stderr)[-3000:]}
    steps = [r for r in map(json.loads, metrics.read_text().splitlines()) if "rollout_s" in r][1:]
    seconds = sum(step_walls(proc.stdout + proc.stderr)[1:])
    rollout = sum(r["rollout_s"] for r in steps)
    completion_tokens = sum(r["completion_length"] * PROMPTS * GENERATIONS for r in steps)
    fast = "fast path on" in proc.stdout + proc.stderr
    return figures(seconds, rollout, completion_tokens, len(steps)) | {
        "fast_path": fast, "peak_gib": max(r.get("peak_allocated_gib", 0) for r in steps),
        "completion_length": [round(r["completion_length"], 1) for r in steps],
    }  # fmt: skip


def step_walls(log: str) -> list[float]:
    """Each step's wall seconds, from the progress bar's running mean ("step K/N ... X s/step"): metrics.jsonl's
    token rates cover windows that end when a step's numbers are read, a step late, so they do not time steps."""
    import re

    totals = [int(k) * float(x) for k, x in re.findall(r"train: step (\d+)/\d+ .*?([\d.]+) s/step", log)]
    return [b - a for a, b in zip([0.0, *totals], totals, strict=False)]


def figures(seconds: float, rollout: float, completion_tokens: float, steps: int) -> dict:
    train_tokens = steps * PROMPTS * GENERATIONS * PROMPT_TOKENS + completion_tokens
    return {
        "s_per_step": round(seconds / steps, 2),
        "rollout_share": round(rollout / seconds, 3),
        "rollout_tokens_per_s": round(completion_tokens / rollout, 1) if rollout else None,
        "train_tokens_per_s": round(train_tokens / (seconds - rollout), 1),
        "steps_timed": steps,
    }


def run_trl(out: Path) -> dict:
    import dataclasses

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(MODEL)
    tok.pad_token = tok.pad_token or tok.eos_token
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(MODEL, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0})  # fmt: skip
    wanted = dict(
        output_dir=str(out / "trl"), per_device_train_batch_size=PROMPTS, gradient_accumulation_steps=GENERATIONS,
        num_generations=GENERATIONS, max_completion_length=NEW_TOKENS, max_prompt_length=PROMPT_TOKENS + 8,
        temperature=1.0, learning_rate=1e-5, max_steps=STEPS, beta=0.0, loss_type="dapo", bf16=True,
        gradient_checkpointing=True, logging_steps=1, report_to="none", save_strategy="no", use_vllm=False,
        optim="paged_adamw_8bit", num_iterations=1, disable_tqdm=True,
    )  # fmt: skip
    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    args = GRPOConfig(**{k: v for k, v in wanted.items() if k in known})
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=QKVO, task_type="CAUSAL_LM")
    marks: list[float] = []
    generating = [0.0]

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            marks.append(time.perf_counter())

    rows = Dataset.from_list(prompt_rows(PROMPTS * STEPS))
    trainer = GRPOTrainer(model=model, reward_funcs=[zero_reward], args=args, processing_class=tok, peft_config=lora,
                          train_dataset=rows, callbacks=[Clock()])  # fmt: skip
    generate = trainer.model.generate

    def timed_generate(*a, **k):
        torch.cuda.synchronize()
        start = time.perf_counter()
        ids = generate(*a, **k)
        torch.cuda.synchronize()
        if marks:  # after the warm-up step
            generating[0] += time.perf_counter() - start
        return ids

    trainer.model.generate = timed_generate
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    seconds = marks[-1] - marks[0]
    steps = len(marks) - 1
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    record = figures(seconds, generating[0], sum(lengths[1:]) * PROMPTS * GENERATIONS, steps)
    return record | {"peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "completion_length": lengths,
                     "generations_per_step": args.generation_batch_size if hasattr(args, "generation_batch_size")
                     else None}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", choices=["kotune", "trl"], default="kotune")
    ap.add_argument("--steps", type=int, default=4, help="steps (the first one is not timed)")
    ap.add_argument("overrides", nargs="*", help="kotune: config overrides (key=value), e.g. train.kernels=off")
    args = ap.parse_args()
    globals()["STEPS"] = args.steps  # read by the runs' configs and prompt counts
    anchor().build_model_dir(MODEL, 32)
    out = Path(os.environ.get("BENCH_OUT", "/tmp/grpo-bench")) / args.tool
    out.mkdir(parents=True, exist_ok=True)
    record = run_kotune(out, args.overrides) if args.tool == "kotune" else run_trl(out)
    shape = dict(prompts=PROMPTS, generations=GENERATIONS, prompt_tokens=PROMPT_TOKENS, max_new_tokens=NEW_TOKENS)
    emit({"tool": args.tool, "overrides": args.overrides, "gpu": gpu_name(), **shape, **record})


if __name__ == "__main__":
    main()
