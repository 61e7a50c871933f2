"""The walkthrough's recipe on given rows, in the given order: ``anchor_bench.py --tool seed``'s setup, other data.

    python bench/seed_recipe.py --rows /tmp/v_rows.json --steps 30 --dropout 0.05             # case V subset
    python bench/seed_recipe.py --rows /tmp/v_rows.json --steps 20 --dropout 0 --save-init F  # case P

Model, quantization, ``prepare_model_for_kbit_training``, LoRA, gradient checkpointing, Trainer arguments and
collator are the anchor's line for line (``../shared/gpu/anchor_bench.py``); what differs: the rows come from a
file (kotune's tokenized rows, in kotune's epoch order) and are read in that order (``train_sampling_strategy
="sequential"``), so step k trains the rows kotune's step k trains. ``--save-init`` writes the adapter as
initialised, so kotune can start from the same one. Prints ``RESULT {...}`` with per-step seconds, input
tokens and losses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL_DIR, QKVO, anchor, emit, gpu_name  # noqa: E402


def build_model(model_dir: str, targets: list[str], dropout: float):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kotune.model.load import nf4_config

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token_id = tok.eos_token_id
    tok.padding_side = "right"
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    q = nf4_config(dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=q, dtype=dtype, device_map={"": 0 if cuda else "cpu"}
    )
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(
        model,
        LoraConfig(
            r=16, lora_alpha=16, target_modules=targets, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM"
        ),
    )
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return tok, model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", required=True, help="JSON list of {input_ids, labels}, in training order")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=2, help="learning-rate warm-up steps")
    ap.add_argument("--warm", type=int, default=2, help="steps left out of tokens/s")
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--targets", default=",".join(QKVO))
    ap.add_argument("--case", default="V")
    ap.add_argument("--save-init", help="write the initial adapter here (safetensors)")
    ap.add_argument("--model-dir", default=MODEL_DIR)
    args = ap.parse_args()
    bench = anchor()
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    rows = json.loads(Path(args.rows).read_text(encoding="utf-8"))[: args.steps * 8]
    data = [dict(r, attention_mask=[1] * len(r["input_ids"])) for r in rows]
    torch.manual_seed(42)
    tok, model = build_model(args.model_dir, args.targets.split(","), args.dropout)
    if args.save_init:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        state = get_peft_model_state_dict(model)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, args.save_init)
    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(time.time())

    cuda = torch.cuda.is_available()
    trainer = Trainer(
        model=model,
        train_dataset=bench.ListDS(data),
        args=TrainingArguments(
            output_dir="/tmp/bench-seed-out",
            per_device_train_batch_size=1,
            gradient_accumulation_steps=8,
            warmup_steps=args.warmup,
            max_steps=args.steps,
            learning_rate=2e-4,
            adam_beta1=0.9,
            adam_beta2=0.95,
            bf16=cuda,
            logging_steps=1,
            optim="paged_adamw_8bit" if cuda else "adamw_torch",
            lr_scheduler_type="cosine",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            train_sampling_strategy="sequential",
            use_cpu=not cuda,
        ),
        data_collator=DataCollatorForSeq2Seq(tok, pad_to_multiple_of=8, return_tensors="pt", padding=True),
        callbacks=[Clock()],
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    trainer.train()
    seconds = [b - a for a, b in zip([start] + marks[:-1], marks, strict=True)]
    tokens = [sum(len(r["input_ids"]) for r in rows[i * 8 : i * 8 + 8]) for i in range(args.steps)]
    timed_s, timed_tokens = sum(seconds[args.warm :]), sum(tokens[args.warm :])
    emit(
        {
            "tool": "seed",
            "case": args.case,
            "variant": "walkthrough",
            "tokens_per_s": round(timed_tokens / timed_s, 1) if timed_s else None,
            "s_per_step": round(timed_s / max(1, args.steps - args.warm), 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0.0,
            "steps": args.steps,
            "wall_s": round(sum(seconds), 1),
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "step_s": [round(s, 4) for s in seconds],
            "step_tokens": tokens,
            "gpu": gpu_name(),
        }
    )


if __name__ == "__main__":
    main()
