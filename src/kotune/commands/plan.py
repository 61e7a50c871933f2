"""``kotune plan CONFIG [key=value ...] [--gpu NAME] [--gpus N] [--fit]``: memory and time before spending them.

Reads the tokenizer and the data (tokenized and cached as training would), and the base model's ``config.json``;
no weights are loaded and no GPU is needed. ``kotune plan --preset NAME [key=value ...] [--gpu NAME]`` plans a
preset's recipe with nothing from the hub: the shape from the preset, every row at ``data.cutoff_len``, on the named
GPU or on each card the preset names.
"""

from __future__ import annotations

from kotune.commands.train import add_config_arguments


def register(sub) -> None:
    from kotune.plan.gpus import GPUS

    p = sub.add_parser("plan", help="predict peak GPU memory and time of a training run; pick settings that fit")
    add_config_arguments(p, optional=True)
    p.add_argument("--preset", metavar="NAME", help="plan a preset's recipe offline (see `kotune init --list`)")
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
    from kotune.plan.packing_advice import packing_advice

    if args.preset:
        return run_preset(args)
    if args.config is None:
        raise ConfigError("no config given: kotune plan CONFIG.yaml [key=value ...], or kotune plan --preset NAME")
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
    if advice := packing_advice(cfg, lengths, args.gpus, plan, shape):
        print(advice)
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


def run_preset(args) -> int:
    """``--preset``: the recipe's plan on ``--gpu``, or on each card the preset names; 1 when it fits none."""
    from kotune.config import ConfigError
    from kotune.plan.estimate import render
    from kotune.plan.gate import plan_preset
    from kotune.plan.gpus import gpu_named
    from kotune.presets import preset_named

    if args.fit or args.gpus != 1:
        raise ConfigError("--preset plans one process with the recipe as written: drop --fit / --gpus, or write the "
                          "config with `kotune init --preset` and plan that")  # fmt: skip
    preset = preset_named(args.preset)
    overrides = [args.config, *args.overrides] if args.config else args.overrides  # no CONFIG: all are overrides
    cfg = preset.config(overrides)
    fits = []
    for name in [args.gpu] if args.gpu else list(preset.fits):
        plan = plan_preset(preset, cfg, gpu_named(name))
        print("\n".join(render(plan)))
        fits.append(plan.fits)
    return 0 if any(fits) else 1
