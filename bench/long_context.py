"""The longest single sequence that trains: peak GPU memory and time of one QLoRA step per length.

    python bench/long_context.py --tool kotune --lengths 16384,32768,65536
    python bench/long_context.py --tool unsloth --lengths 16384,32768,65536     # the unsloth wheel set
    python bench/long_context.py --tool kotune --lengths 98304 --cap-gib 24     # under a 24 GiB cap

The model is the anchor's (Llama-3-8B shape, random bf16 weights, NF4), its context raised so no tool rescales
RoPE; LoRA r16 / alpha 16 on q,k,v,o, dropout 0, one sequence a step (every token labelled), 8-bit paged AdamW,
gradient checkpointing (each tool's own). Per length: ``--steps`` steps (2: one warm-up, one timed); peak allocated and
reserved memory over them (``torch.cuda.max_memory_*`` from after the model load), the two losses. An OOM is
recorded and ends the run. kotune runs through ``Fit.step`` (the body of ``kotune train``'s loop) with the CUDA
allocator setting ``kotune train`` makes (``kotune.training.memory.growable_segments``) unless ``--allocator``
names another.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QKVO, anchor, emit  # noqa: E402

CONTEXT = 1 << 20


def model_dir(path: str) -> str:
    anchor().build_model_dir(path, 32)
    config = Path(path) / "config.json"
    values = json.loads(config.read_text())
    values["max_position_embeddings"] = CONTEXT  # no tool may rescale RoPE for "long" sequences
    config.write_text(json.dumps(values))
    return path


def sequence(n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128000, (n,), generator=g).tolist()


def kotune_steps(path: str, lengths: list[int]):
    import torch

    from kotune import fast
    from kotune.config_load import load_config
    from kotune.data.examples import Example
    from kotune.model.load import load_base_model, load_tokenizer
    from kotune.model.lora import attach_lora
    from kotune.training.build import TrainingModel
    from kotune.training.loop import Fit
    from kotune.training.objective import SupervisedObjective

    values = {
        "model.path": path, "lora.r": 16, "lora.alpha": 16, "lora.dropout": 0.0,
        "lora.target_modules": "[" + ",".join(QKVO) + "]", "data.val_size": 0, "data.cutoff_len": max(lengths),
        "train.micro_batch_size": 1, "train.gradient_accumulation_steps": 1, "train.warmup_steps": 0,
        "train.optimizer": "paged_adamw_8bit", "train.packing": "off", "train.max_steps": 2, "train.seed": 42,
    }  # fmt: skip
    cfg = load_config(None, [f"{k}={v}" for k, v in values.items()])
    tokenizer = load_tokenizer(path, cfg.model)
    base = load_base_model(path, cfg.model, fast_path=True)
    for n in lengths:
        ids = sequence(n)
        cfg.train.output_dir = tempfile.mkdtemp()
        torch.manual_seed(cfg.train.seed)
        model = attach_lora(base, cfg.lora)
        trained = TrainingModel(model, fast.build(model, cfg))
        objective = SupervisedObjective(trained, tokenizer, cfg, packed=False)
        fit = Fit(cfg, trained, objective, [Example(0, ids, ids)], [], Path(cfg.train.output_dir))

        def step(fit=fit):
            fit.step()
            return fit.settle(fit.state.step)[0]["loss"]

        yield n, step
        del fit, trained, objective
        model.unload()


def unsloth_steps(path: str, lengths: list[int]):
    import unsloth  # noqa: F401  (before transformers and peft, as unsloth asks)

    # isort: split
    import bitsandbytes as bnb
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=path, max_seq_length=max(lengths), dtype=torch.bfloat16, load_in_4bit=True
    )
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=16, target_modules=QKVO, lora_dropout=0.0, bias="none",
        use_gradient_checkpointing="unsloth", random_state=42,
    )  # fmt: skip
    model.config.use_cache = False
    FastLanguageModel.for_training(model)
    optimizer = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    for n in lengths:
        ids = torch.tensor([sequence(n)], device="cuda")

        def step(ids=ids):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        yield n, step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", choices=["kotune", "unsloth"], default="kotune")
    ap.add_argument("--lengths", default="16384,32768,65536")
    ap.add_argument("--cap-gib", type=float, help="cap this process's GPU memory (set_per_process_memory_fraction)")
    ap.add_argument("--allocator", help="PYTORCH_CUDA_ALLOC_CONF for this run (default: kotune's, or unsloth's)")
    ap.add_argument("--model-dir", default="/tmp/llama3-8b-long")
    ap.add_argument("--untiled", action="store_true", help="kotune: the MLP over a whole pass at once")
    ap.add_argument("--steps", type=int, default=2, help="steps per length (the last one timed)")
    args = ap.parse_args()
    if args.untiled:
        import kotune.fast.decoder

        kotune.fast.decoder.TILE_FROM = 1 << 40
    if args.allocator is not None:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = args.allocator
    elif args.tool == "kotune":
        from kotune.training.memory import growable_segments

        growable_segments()
    import torch

    path = model_dir(args.model_dir)
    if args.cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / total)
    lengths = [int(x) for x in args.lengths.split(",")]
    steps = kotune_steps(path, lengths) if args.tool == "kotune" else unsloth_steps(path, lengths)
    record = {"tool": args.tool, "cap_gib": args.cap_gib, "gpu": torch.cuda.get_device_name(0)}
    record.update(untiled=args.untiled, steps=args.steps)
    record["allocator"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    for n, step in steps:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            losses = [step() for _ in range(args.steps - 1)]
            torch.cuda.synchronize()
            start = time.perf_counter()
            losses.append(step())
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        except torch.OutOfMemoryError:
            emit({**record, "tokens": n, "oom": True, "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30})
            return
        emit({
            **record, "tokens": n, "s_per_step": round(seconds, 2), "tokens_per_s": round(n / seconds, 1),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2), "losses": losses,
        })  # fmt: skip


if __name__ == "__main__":
    main()
