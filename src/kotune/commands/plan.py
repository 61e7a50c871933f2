"""``kotune plan CONFIG [key=value ...] [--gpu NAME] [--gpus N] [--fit]``: memory and time before spending them.

Reads the tokenizer and the data (tokenized and cached as training would), and the base model's ``config.json``;
no weights are loaded and no GPU is needed.
"""

from __future__ import annotations

from kotune.commands.train import add_config_arguments


def register(sub) -> None:
    from kotune.plan.gpus import GPUS

    p = sub.add_parser("plan", help="predict peak GPU memory and time of a training run; pick settings that fit")
    add_config_arguments(p)
    p.add_argument("--gpu", metavar="NAME", help=f"plan for this GPU: {', '.join(g.name for g in GPUS.values())} "
                   "(default: this machine's)")  # fmt: skip
    p.add_argument(
        "--gpus", type=int, default=1, metavar="N", help="processes (one per GPU) under torchrun (DDP or FSDP)"
    )
    p.add_argument("--fit", action="store_true", help="print the largest micro-batch (or cutoff_len) that fits")
    p.set_defaults(run=run)


def run(args) -> int:
    from kotune import output
    from kotune.commands.data import load_prepared
    from kotune.config import ConfigError
    from kotune.config_load import load_config
    from kotune.plan.estimate import render
    from kotune.plan.gate import choose_distributed, fit_settings, plan_for
    from kotune.plan.gpus import gpu_named, present_gpu

    cfg = load_config(args.config, args.overrides)
    if args.gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {args.gpus}")
    gpu = gpu_named(args.gpu) if args.gpu else present_gpu()
    if gpu is None:
        raise ConfigError("no CUDA GPU on this machine: name the one to plan for, e.g. --gpu L4 (see --help)")
    model_path, _, train, _, _ = load_prepared(cfg)
    lengths = [e.input_tokens for e in train]
    cfg = choose_distributed(cfg, model_path, lengths, gpu, args.gpus)  # train.distributed auto: as train picks
    plan, shape = plan_for(cfg, model_path, lengths, gpu, args.gpus)
    for line in render(plan):
        print(line)
    if args.fit:
        fitted = fit_settings(cfg, shape, lengths, gpu, plan.fast, args.gpus)
        t, d = fitted.train, fitted.data
        print(
            f"kotune: fits with train.micro_batch_size={t.micro_batch_size} "
            f"train.gradient_accumulation_steps={t.gradient_accumulation_steps} data.cutoff_len={d.cutoff_len}"
        )
    if not plan.fits:
        output.warn("the run as configured is predicted not to fit; `kotune train` would refuse it")
        return 1
    return 0
