"""``kotune merge RUN_DIR [--into dequantized|original] [--dtype bf16|fp16|fp32] [--out DIR]``"""

from __future__ import annotations

from kotune.export import merge as merging


def register(sub) -> None:
    p = sub.add_parser("merge", help="fold the adapter into the base weights, verify, and save a plain model folder")
    p.add_argument("run_dir", help="the training run's output folder (adapter, template, resolved config)")
    p.add_argument(
        "--into",
        choices=merging.TARGETS,
        default="dequantized",
        help="dequantized: the 4-bit weights the adapter was trained against (default); original: the "
        "full-precision base. Both are verified and reported",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(merging.DTYPE_NAMES),
        default=None,
        help="dtype of the saved weights (default: the run's model.compute_dtype)",
    )
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/merged)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a different merge that kotune wrote in --out (never other files, the run or a folder holding it)",
    )
    p.add_argument(
        "--allow-drift",
        action="store_true",
        help=f"keep the merge even if top-1 agreement < {100 * merging.MIN_TOP1_AGREEMENT:.0f}%% or the perplexity "
        f"moves more than {100 * merging.MAX_PERPLEXITY_CHANGE:.0f}%% from the adapter's",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    merging.merge(args.run_dir, args.out, args.into, args.dtype, args.force, args.allow_drift)
    return 0
