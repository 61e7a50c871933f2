"""Peak memory and step time of the fast path over a grid of settings: the data ``kotune plan`` is fitted and
checked on (issue 19).

    python bench/plan_grid.py                        # the whole grid on the Llama-3-8B-shaped anchor model
    python bench/plan_grid.py --only c,f --steps 1   # some settings

Each setting trains ``warm + steps`` optimizer steps of 8 fixed-length rows (the anchor's random rows) through
``kotune.train.Fit``, on the base model loaded once. Peak is ``torch.cuda.max_memory_allocated`` over the steps,
reset after LoRA is attached (so it includes the weights, LoRA and optimizer state); step time is the mean over
the timed steps with the GPU synchronised. Every record also carries the prediction of ``kotune.plan`` for the same
setting as the code stood when the call ran (``predicted_*``): predicted before the run, not fitted to it.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ALL7, CASES, MODEL_DIR, QKVO, Case, anchor, emit, gpu_name  # noqa: E402
from kotune_run import case_config, timed_run, v_examples  # noqa: E402

from kotune import fast  # noqa: E402
from kotune.data.examples import Example  # noqa: E402
from kotune.data.order import feeds_packed  # noqa: E402
from kotune.model.load import load_base_model, load_tokenizer  # noqa: E402
from kotune.model.lora import attach_lora  # noqa: E402
from kotune.training.build import TrainingModel  # noqa: E402
from kotune.training.loop import Fit  # noqa: E402
from kotune.training.objective import SupervisedObjective  # noqa: E402

GRID = {  # name: (row length = cutoff_len, packing, LoRA targets, micro-batch size); 8 rows an optimizer step
    "a": (512, "on", QKVO, 1),
    "b": (1024, "on", QKVO, 1),
    "c": (2048, "on", QKVO, 1),
    "d": (4096, "on", QKVO, 1),
    "e": (8192, "on", QKVO, 1),
    "f": (2048, "off", QKVO, 1),
    "g": (2048, "off", QKVO, 2),
    "h": (2048, "off", QKVO, 4),
    "i": (1024, "on", ALL7, 2),
    "j": (4096, "off", ALL7, 1),
    "k": (8192, "off", QKVO, 1),
    "l": (512, "off", ALL7, 4),
    "m": (2048, "on", ALL7, 4),
    "n": (512, "on", QKVO, 4),
}
CHECK = {  # settings the fit never saw, predicted before they ran (bench/RESULTS.md, "kotune plan")
    "p": (3072, "on", QKVO, 1),
    "q": (6144, "off", ALL7, 1),
    "r": (1536, "off", QKVO, 2),
    "s": (768, "on", ALL7, 8),
    "t": (8192, "on", ALL7, 2),
    "u": (4096, "off", QKVO, 4),
    "v": (None, "on", QKVO, 1),  # case V's real variable-length rows (bench/vdata.py), cutoff_len 4,098
}
GRID |= CHECK


def setting_config(name: str, model_dir: str, steps: int):
    seq, packing, targets, micro = GRID[name]
    case = Case(name, seq, targets, 0.05 if targets == QKVO else 0.0, steps, 1)
    cfg = case_config(case, model_dir, plain=False, packing=packing, steps=steps)
    if seq is not None:
        cfg.data.cutoff_len = seq
    cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps = micro, 8 // micro
    cfg.train.output_dir = tempfile.mkdtemp()
    return case, cfg


def predicted(cfg, model_dir: str, rows: list[Example], use_fast: bool) -> dict:
    """``kotune.plan``'s figures for this setting on the present GPU: the peak over all steps, the mean time of the
    timed steps (all but the first, as ``timed_run`` counts them)."""
    from kotune.plan.estimate import estimate, pass_seconds
    from kotune.plan.gpus import gpu_named, present_gpu
    from kotune.plan.shape import read_shape

    gpu, shape = present_gpu() or gpu_named("H200"), read_shape(model_dir)
    plan = estimate(shape, cfg, [len(r.input_ids) for r in rows], gpu, fast=use_fast)
    timed = [pass_seconds(shape, cfg, p, gpu) for p in plan.passes if p.step >= 1]
    return {
        "predicted_peak_gib": round(plan.peak_bytes / 2**30, 3),
        "predicted_s_per_step": round(sum(timed) / max(1, plan.steps - 1), 3),
        "longest_pass_tokens": plan.longest.tokens,
    }


def run_setting(base, tokenizer, name: str, args) -> dict:
    case, cfg = setting_config(name, args.model_dir, args.steps + 1)
    if case.seq is None:  # case V: rows through kotune's own pipeline, only as many as the steps use
        rows = v_examples(cfg, tokenizer)[: 8 * cfg.train.max_steps]
    else:
        rows = [
            Example(i, r["input_ids"], r["labels"])
            for i, r in enumerate(anchor().make_data(8 * cfg.train.max_steps, case.seq))
        ]
    torch.manual_seed(cfg.train.seed)
    model = attach_lora(base, cfg.lora)
    use_fast, _ = fast.wanted(cfg, model.config)
    trained = TrainingModel(model, fast.build(model, cfg) if use_fast else None)
    objective = SupervisedObjective(trained, tokenizer, cfg, feeds_packed(cfg.train, trained.fast is not None))
    fit = Fit(cfg, trained, objective, rows, [], Path(cfg.train.output_dir))
    allocated = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    seq, packing, targets, micro = GRID[name]
    record = {"tool": "kotune", "case": name, "seq": seq, "packing": packing, "micro_batch": micro, "rows": len(rows)}
    record.update(
        targets=len(targets), fast_path=trained.fast is not None, gpu=gpu_name(), allocated_gib=round(allocated, 3)
    )
    record.update(predicted(cfg, args.model_dir, rows, use_fast))
    record.update(timed_run(fit, 1))
    del fit
    model.unload()
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(k for k in GRID if k not in CHECK), help="settings (default: the fit's)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per setting (after one warm-up step)")
    ap.add_argument("--model-dir", default=MODEL_DIR)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    if torch.cuda.is_available():
        anchor().build_model_dir(args.model_dir, args.layers)
    cfg = case_config(replace(CASES["S"]), args.model_dir, False, "auto", 1)
    started = time.perf_counter()
    tokenizer = load_tokenizer(args.model_dir, cfg.model)
    base = load_base_model(args.model_dir, cfg.model, fast_path=True)
    load_s = time.perf_counter() - started
    weights = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    load_peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    emit(
        {
            "tool": "kotune",
            "case": "load",
            "load_s": round(load_s, 1),
            "weights_gib": round(weights, 3),
            "load_peak_gib": round(load_peak, 3),
        }
    )
    for name in args.only.split(","):
        emit(run_setting(base, tokenizer, name, args))


if __name__ == "__main__":
    main()
