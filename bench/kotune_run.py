"""kotune's side of the GPU benchmark: ``Fit.step`` (the body of ``kotune train``'s loop) timed per case.

    python bench/kotune_run.py --cases S,A,L --variants fast,unfused,resident      # fast path (kernels: auto)
    python bench/kotune_run.py --cases S --plain                                  # kernels: off, prepared model
    python bench/kotune_run.py --cases V,P --init /tmp/init_adapter.safetensors   # epoch / same-maths check
    python bench/kotune_run.py --dump-v /tmp/v_rows.json                          # V rows, in kotune's order

The model is loaded once per process the way ``kotune.model.load`` loads it (fast path: no fp32 copies; plain:
peft's ``prepare_model_for_kbit_training``), then each case attaches LoRA with ``kotune.model.lora.attach_lora``
and trains through ``kotune.training.loop.Fit``. Tokens/s counts non-padding input tokens of the timed steps (after
``warm`` steps) over their wall time with the GPU synchronised; peak is ``torch.cuda.max_memory_allocated``
from after the model load (the anchor's convention).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CASES, MODEL_DIR, V_ROWS, V_SEED, Case, anchor, emit, fixed_rows, gpu_name  # noqa: E402

from kotune import fast  # noqa: E402
from kotune.config import Config  # noqa: E402
from kotune.config_load import load_config  # noqa: E402
from kotune.data.batching import epoch_order  # noqa: E402
from kotune.data.examples import Example  # noqa: E402
from kotune.data.order import feeds_packed  # noqa: E402
from kotune.fast import lora  # noqa: E402
from kotune.model.load import load_base_model, load_tokenizer  # noqa: E402
from kotune.model.lora import attach_lora  # noqa: E402
from kotune.training.build import TrainingModel  # noqa: E402
from kotune.training.loop import Fit  # noqa: E402
from kotune.training.objective import SupervisedObjective  # noqa: E402

VARIANTS = {
    "fast": {},  # kotune's default on CUDA: every lever on, the step's rows packed (train.packing: auto)
    "unpacked": {"packing": "off"},  # micro-batches of exactly one row, as the walkthrough feeds them
    "unfused": {"fused": False},  # no liger kernels: plain PyTorch RMSNorm / RoPE / SiLU
    "resident": {"offload": False},  # layer inputs stay on the GPU
    "gpuembed": {"host_embeddings": False},  # input embedding table stays on the GPU
    "bnbdequant": {"triton_dequant": False},  # bitsandbytes' own NF4 dequantization
    "adamw": {"optimizer": "adamw_fused"},  # torch's fused AdamW instead of the preset's paged 8-bit one
    "full": {"packing": "full"},  # whole-set packing: cutoff_len-token sequences, 8 a step
    "fulladamw": {"packing": "full", "optimizer": "adamw_fused"},
    # the same 8 sequences a step in fewer, longer passes (micro-batch x accumulation stays 8)
    "fullmb2": {"packing": "full", "optimizer": "adamw_fused", "micro_batch_size": 2},
    "fullmb4": {"packing": "full", "optimizer": "adamw_fused", "micro_batch_size": 4},
    # what LoRA dropout costs: the case's own settings with lora.dropout 0
    "nodrop": {"dropout": 0.0},
    "fullnodrop": {"packing": "full", "optimizer": "adamw_fused", "dropout": 0.0},
    # the adapter cast to bf16 at each use (~7 a pass) instead of once a pass (kotune.fast.lora.adapter_in's store)
    "castsperuse": {"casts_per_use": True},
}


def case_config(case: Case, model_dir: str, plain: bool, packing: str, steps: int | None) -> Config:
    values = {
        "model.path": model_dir,
        "lora.r": 16,
        "lora.alpha": 16,
        "lora.dropout": case.dropout,
        "lora.target_modules": "[" + ",".join(case.targets) + "]",
        "data.val_size": 0,
        "train.micro_batch_size": 1,
        "train.gradient_accumulation_steps": 8,
        "train.warmup_steps": 2,
        "train.learning_rate": 2e-4,
        "train.optimizer": "paged_adamw_8bit",
        "train.kernels": "off" if plain else "auto",
        "train.packing": packing,
        "train.max_steps": "null" if steps is None else steps,
        "train.seed": 42,
    }
    if not torch.cuda.is_available():  # CPU dry run of this script on a tiny model
        values.update({"model.compute_dtype": "float32", "train.optimizer": "adamw_torch"})
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def v_examples(cfg: Config, tokenizer, n: int = V_ROWS) -> list[Example]:
    """Case V's rows through kotune's own pipeline (template, tokenization, masks)."""
    import vdata

    from kotune.data.prepare import prepare

    path = vdata.write(Path(tempfile.mkdtemp()) / "v.jsonl", n, V_SEED)
    cfg.data.path = str(path)
    return prepare(cfg.data, tokenizer).train


def rows_for(case: Case, cfg: Config, tokenizer, v_rows: int) -> list[Example]:
    if case.seq is not None:
        return [Example(i, r["input_ids"], r["labels"]) for i, r in enumerate(fixed_rows(case))]
    return v_examples(cfg, tokenizer, v_rows)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_run(fit: Fit, warm: int) -> dict:
    """Run every step of ``fit`` as ``Fit.run`` does (a step's numbers read while the next one runs); the
    steps after ``warm`` are timed together, the GPU synchronised at both ends only. Input tokens (padding not
    counted) come from the steps' own records."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    records = []
    started = time.perf_counter()
    while fit.state.step < min(warm, fit.steps):
        fit.step()
        records += fit.settle(fit.state.step)
    sync()
    start = time.perf_counter()
    while fit.state.step < fit.steps:
        fit.step()
        records += fit.settle(fit.state.step - 1)
    records += fit.settle(fit.state.step)
    sync()
    timed_s = time.perf_counter() - start
    timed = records[warm:]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return {
        "tokens_per_s": round(sum(r["input_tokens"] for r in timed) / timed_s, 1) if timed else None,
        "s_per_step": round(timed_s / max(1, len(timed)), 3),
        "peak_gib": round(peak, 2),
        "steps": len(records),
        "wall_s": round(time.perf_counter() - started, 1),
        "losses": [r["loss"] for r in records],
        "step_tokens": [r["input_tokens"] for r in records],
    }


@contextlib.contextmanager
def casting_at_each_use(on: bool):
    """The ``castsperuse`` ablation: ``kotune.fast.lora.adapter_in`` keeps no pass's casts, as before it did."""
    kept = lora.adapter_in
    if on:
        lora.adapter_in = lambda proj, dtype, casts: kept(proj, dtype, None)
    try:
        yield
    finally:
        lora.adapter_in = kept


def run_case(base, tokenizer, case: Case, variant: str, args) -> dict:
    options = dict(VARIANTS[variant])
    packing = options.pop("packing", "auto")
    optimizer = options.pop("optimizer", "paged_adamw_8bit")
    micro_batch = options.pop("micro_batch_size", 1)
    case = replace(case, dropout=options.pop("dropout", case.dropout))
    casts_per_use = options.pop("casts_per_use", False)
    steps = None if case.name == "V" and not args.steps else case.steps + case.warm
    cfg = case_config(case, args.model_dir, args.plain, packing, steps)
    cfg.train.optimizer = optimizer if torch.cuda.is_available() else cfg.train.optimizer
    cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps = micro_batch, 8 // micro_batch
    cfg.train.output_dir = tempfile.mkdtemp()
    rows = rows_for(case, cfg, tokenizer, args.v_rows)
    torch.manual_seed(cfg.train.seed)  # LoRA A is drawn at random, as in kotune.training.build.load_for_training
    model = attach_lora(base, cfg.lora)
    if args.init and case.name == "P":  # start from the seed recipe's own initial adapter
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(args.init))
    use_fast, _ = fast.wanted(cfg, model.config)
    # an ablation (the fast path without one lever), or a CPU dry run forcing the fast path on
    forced = (use_fast and options) or (args.quick and not args.plain and not use_fast)
    trained = TrainingModel(model, fast.build(model, cfg, **options) if use_fast or forced else None)
    objective = SupervisedObjective(trained, tokenizer, cfg, feeds_packed(cfg.train, trained.fast is not None))
    fit = Fit(cfg, trained, objective, rows, [], Path(cfg.train.output_dir))
    record = {"tool": "kotune-plain" if args.plain else "kotune", "case": case.name, "variant": variant}
    record.update(fast_path=trained.fast is not None, packing=packing, optimizer=cfg.train.optimizer)
    record.update(micro_batch_size=micro_batch, rows=len(rows), gpu=gpu_name())
    with casting_at_each_use(casts_per_use):
        record.update(timed_run(fit, case.warm))
        if args.profile and torch.cuda.is_available():
            from profile_step import profile

            record.update(profile(fit, f"{case.name}/{variant}"))
    del fit
    model.unload()  # takes the LoRA layers out again, so the next case starts from the bare base model
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


def dump_v(path: str, model_dir: str, n: int) -> None:
    """Case V's tokenized rows in the order kotune's first epoch visits them (for the seed recipe's run)."""
    import vdata

    if Path(path).is_file():
        print(f"{path} already written")
        return

    cfg = case_config(CASES["V"], model_dir, plain=False, packing="auto", steps=None)
    rows = v_examples(cfg, load_tokenizer(model_dir, cfg.model), n)
    print("V rows (tokens):", json.dumps(vdata.summary([len(r.input_ids) for r in rows])))
    order = epoch_order(len(rows), cfg.train.seed, 0)
    data = [{"input_ids": rows[i].input_ids, "labels": rows[i].labels} for i in order]
    Path(path).write_text(json.dumps(data), encoding="utf-8")
    print(f"wrote {len(data)} V rows to {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="S")
    ap.add_argument("--variants", default="fast")
    ap.add_argument("--plain", action="store_true", help="kernels: off on a prepared (fp32-upcast) model")
    ap.add_argument("--init", help="initial adapter (safetensors) for case P")
    ap.add_argument("--dump-v", help="write case V's rows in kotune's epoch order to this JSON file and exit")
    ap.add_argument("--model-dir", default=MODEL_DIR)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--v-rows", type=int, default=V_ROWS, help="rows of case V (4,000; fewer for a dry run)")
    ap.add_argument("--quick", action="store_true", help="dry run: one warm-up and one timed step per case")
    ap.add_argument("--profile", action="store_true", help="after each run, profile one more step")
    ap.add_argument("--steps", type=int, help="timed steps of every case instead of the case's own")
    args = ap.parse_args()
    if torch.cuda.is_available():
        anchor().build_model_dir(args.model_dir, args.layers)
    if args.dump_v:
        return dump_v(args.dump_v, args.model_dir, args.v_rows)
    cfg = case_config(CASES["S"], args.model_dir, args.plain, "auto", 1)
    started = time.perf_counter()
    tokenizer = load_tokenizer(args.model_dir, cfg.model)
    base = load_base_model(args.model_dir, cfg.model, fast_path=not args.plain)
    print(f"model loaded in {time.perf_counter() - started:.1f}s", flush=True)
    for name in args.cases.split(","):
        for variant in args.variants.split(",") if name in ("S", "A", "V") else ["fast"]:
            case = CASES[name]
            if args.quick:
                case = replace(case, steps=min(case.steps, 1), warm=min(case.warm, 1))
            if args.steps:
                case = replace(case, steps=args.steps)
            emit(run_case(base, tokenizer, case, variant, args))


if __name__ == "__main__":
    main()
