"""``kotune eval RUN_DIR|MODEL_DIR [--base] [--data FILE] [--tasks ...]``: did the fine-tune help?

On the model as kotune loads it (an adapter on its 4-bit or full base, a merged folder, or with ``--base`` the
base model alone, prompted with the run's template, so before / after is one command each): loss and perplexity
on held-out rows, generation checks on their prompts (a GRPO run: its held-out prompts scored with its rewards),
multiple choice by log-likelihood, and lm-eval tasks.
Writes ``eval_report.json`` and ``eval_report.md``; ``--compare`` puts an earlier report beside it with changes.
"""

from __future__ import annotations

from pathlib import Path

from kotune import output


def register(sub) -> None:
    from kotune.evaluation.checks import CHECK_SAMPLING

    p = sub.add_parser("eval", help="evaluate a run, a merged model or its base: loss, generation, choices, lm-eval")
    p.add_argument("path", help="a training run's output folder (adapter) or a merged model folder")
    p.add_argument("--base", action="store_true", help="evaluate the run's base model alone (the 'before')")
    p.add_argument(
        "--quantization",
        choices=("4bit", "8bit", "none"),
        default=None,
        help="load the base model quantized like this (default: as it was trained)",
    )
    p.add_argument("--data", help="held-out rows in any supported format (default: the run's validation rows)")
    p.add_argument("--choices", help="multiple-choice JSONL: question, choices, answer (default: kotune's Korean set)")
    p.add_argument("--tasks", help="lm-eval tasks, comma-separated (needs `pip install 'kotune[eval]'`)")
    p.add_argument("--include-path", help="a folder of lm-eval task YAML files to add to lm-eval's own")
    p.add_argument("--limit", type=int, default=None, help="at most N rows / items / task documents of each part")
    p.add_argument("--max-new-tokens", type=int, default=CHECK_SAMPLING.max_new_tokens, help="reply length cap")
    p.add_argument("--compare", help="an earlier eval_report.json (or its folder) to put beside this one")
    p.add_argument("--out", help="where to write the report (default: PATH/eval, or PATH/eval-base with --base)")
    p.set_defaults(run=run)


def load(args):
    """(folder, model, tokenizer, model description) for the model ``args`` name."""
    from transformers import AutoTokenizer

    from kotune.inference.load import load_model
    from kotune.model.load import load_base
    from kotune.run_folder import open_folder

    folder = open_folder(args.path)
    if not args.base:
        model, tokenizer = load_model(folder, args.quantization)
        kind = "merged" if folder.merged else "adapter"
        return folder, model, tokenizer, {"name": f"{kind} {folder.path.name}", "kind": kind, "path": str(folder.path)}
    tokenizer = AutoTokenizer.from_pretrained(folder.path)  # the run's tokenizer and template: same prompts
    model = load_base(folder.config.model, args.quantization or folder.config.model.quantization).eval()
    return folder, model, tokenizer, {"name": "base", "kind": "base", "path": folder.config.model.path}


def run(args) -> int:
    from kotune.evaluation.choice import DEFAULT_SET
    from kotune.evaluation.metrics import stop_warning
    from kotune.evaluation.tables import read_report, write_report

    other = read_report(args.compare) if args.compare else None
    tasks = None
    if args.tasks:  # a missing lm-eval, an unknown task or data not available fail before any model time
        from kotune.evaluation.harness import load_tasks

        tasks = load_tasks([t.strip() for t in args.tasks.split(",") if t.strip()], args.include_path)
    folder, model, tokenizer, described = load(args)
    heldout_texts: list[tuple[int, str]] = []
    if folder.config.train.objective == "grpo":  # prompts without reference replies: scored with the run's rewards
        report = {"model": described, "rewards": reward_part(args, folder, model, tokenizer)}
    else:
        heldout, heldout_texts = heldout_part(args, folder, model, tokenizer)
        report = {"model": described, **heldout}
        warning = stop_warning(report["generation"])
        if warning:
            output.warn(warning)
    report["choice"], report["choice_items"] = choice_part(args.choices or DEFAULT_SET, model, tokenizer, args.limit)
    report["overlap"] = overlap_part(folder, heldout_texts, report["choice_items"])
    if tasks is not None:
        from kotune.evaluation.harness import run_tasks

        report["harness"] = run_tasks(model, tokenizer, tasks, args.limit)
    out = Path(args.out) if args.out else folder.path / ("eval-base" if args.base else "eval")
    table = write_report(out, report, other)
    print(table.read_text(encoding="utf-8"))
    output.info(f"kotune: wrote {out / 'eval_report.json'} and {table}")
    return 0


def heldout_part(args, folder, model, tokenizer) -> tuple[dict, list[tuple[int, str]]]:
    """Loss / perplexity per row and overall, and the generation checks, on the held-out rows; and each evaluated
    row's text (its reference answer, else its prompt) for the overlap check."""
    from dataclasses import replace

    from kotune.evaluation.checks import CHECK_SAMPLING, check_items, generation_checks
    from kotune.evaluation.heldout import load_heldout, overall_loss, reference, row_losses, user_text
    from kotune.inference.generate import pad_id
    from kotune.run_folder import folder_stop_ids

    heldout = load_heldout(folder, tokenizer, args.data)
    examples = heldout.examples[: args.limit] if args.limit else heldout.examples
    rows = row_losses(model, examples, pad_id(tokenizer))
    output.status(f"kotune: eval: loss on {len(rows)} held-out rows of {heldout.source}")
    sampling = replace(CHECK_SAMPLING, max_new_tokens=args.max_new_tokens)
    items = check_items(heldout, folder, tokenizer, args.limit)
    output.status(f"kotune: eval: generating replies to {len(items)} prompts")
    summary, replies = generation_checks(model, tokenizer, items, folder_stop_ids(folder, tokenizer, model), sampling)
    from kotune.hashing import examples_hash

    evaluated = heldout.rows[: args.limit] if args.limit else heldout.rows
    texts = [(i, reference(row, heldout.fmt) or user_text(row, heldout.fmt)) for i, row in enumerate(evaluated)]
    return {
        "data": heldout.source,
        "examples_sha256": examples_hash(examples),  # what --compare checks: same rows, same tokens
        "loss": overall_loss(rows),
        "rows": rows,
        "generation": summary,
        "replies": replies,
    }, texts


def overlap_part(folder, heldout_texts: list[tuple[int, str]], choice_items: list[dict]) -> dict:
    """The held-out rows and multiple-choice items whose text the run's training rows hold, said on stderr too."""
    from kotune.evaluation.overlap import eval_overlap

    questions = [(i, item["question"]) for i, item in enumerate(choice_items)]
    found = eval_overlap(folder.config, heldout_texts, questions)
    if "unchecked" in found:
        output.warn(f"eval: overlap with the training data not checked: {found['unchecked']}")
    for part, hit in found.items():
        if part != "unchecked":
            output.warn(
                f"eval: {len(hit['rows'])} of {hit['of']} {PART_NAMES[part]} overlap the training data "
                "(their text is in training rows): those scores measure memory, not skill"
            )
    return found


PART_NAMES = {"heldout": "held-out rows", "choice": "multiple-choice items"}


def reward_part(args, folder, model, tokenizer) -> dict:
    from kotune.evaluation.rewards import reward_part as score
    from kotune.run_folder import folder_stop_ids

    stops = folder_stop_ids(folder, tokenizer, model)
    output.status("kotune: eval: greedy replies to the held-out prompts, scored with the run's rewards")
    return score(folder, model, tokenizer, stops, args.data, args.limit, args.max_new_tokens)


def choice_part(path, model, tokenizer, limit: int | None) -> tuple[dict, list[dict]]:
    from kotune.evaluation.choice import read_items, score_items

    items = read_items(path)[:limit] if limit else read_items(path)
    output.status(f"kotune: eval: {len(items)} multiple-choice items of {path}")
    summary, records = score_items(model, tokenizer, items)
    return {"file": str(path), **summary}, records
