"""``kotune generate PATH --input prompts.jsonl --output out.jsonl``: batched generation over a file, resumable.

Each output line is the input row with ``row`` (its position in the input), ``generated`` (the reply text) and
``finish`` (``stop``: it ended with EOS / end-of-turn; ``length``: max-new-tokens ran out). Rows already in the
output are skipped, so an interrupted run continues where it stopped without writing a row twice.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kotune.commands.chat import add_model_arguments, add_sampling_arguments, sampling_from
from kotune.inference import Sampling

BATCH_SIZE = 8


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate replies for a file of prompts (any supported data format)")
    add_model_arguments(p)
    p.add_argument("--input", required=True, help="prompts: json / jsonl / csv / parquet, alpaca, prompt, or chat rows")
    p.add_argument("--output", required=True, help="jsonl to write; rows already in it are skipped (resume)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"prompts per batch (default {BATCH_SIZE})")
    add_sampling_arguments(p, Sampling())
    p.set_defaults(run=run)


def completed_rows(path: Path) -> set[int]:
    """Row numbers already in ``path``; a last line without its newline (cut mid-write) is removed from the file."""
    from kotune.data import DataError

    if not path.is_file():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    done: set[int] = set()
    for number, line in enumerate(complete.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            done.add(int(json.loads(line)["row"]))
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path}: line {number} is not a kotune generate row; move the file away") from None
    if len(complete) < len(data):
        with path.open("r+b") as f:
            f.truncate(len(complete))
    return done


def prompt_format(rows: list[dict], where: str) -> str:
    """The row format, told by the prompt-side column alone (prompts need no output / completion)."""
    from kotune.data import DataError
    from kotune.formats import FORMAT_COLUMNS

    for name, columns in FORMAT_COLUMNS.items():
        if all(columns[0] in row for row in rows):
            return name
    wanted = ", ".join(columns[0] for columns in FORMAT_COLUMNS.values())
    raise DataError(f"{where}: every row needs one of the columns {wanted} (the same one in every row)")


def read_prompts(path: str, folder, tokenizer) -> list[tuple[dict, str]]:
    """(row, prompt text) for every input row, formatted as the run formats its training rows."""
    from kotune.data import read_rows
    from kotune.inference import row_prompt

    rows = read_rows(path)
    fmt = prompt_format(rows, path)
    return [(row, row_prompt(row, fmt, folder, tokenizer, path)) for row in rows]


def output_line(row: dict, text: str, stopped: bool) -> str:
    record = {k: v for k, v in row.items() if not k.startswith("_")}
    record.update(row=row["_row"], generated=text, finish="stop" if stopped else "length")
    return json.dumps(record, ensure_ascii=False) + "\n"


def run(args) -> int:
    from transformers import AutoTokenizer

    from kotune.inference import load_model, open_folder

    folder = open_folder(args.path)
    output = Path(args.output)
    done = completed_rows(output)
    prompts = read_prompts(args.input, folder, AutoTokenizer.from_pretrained(folder.path))
    todo = [(row, text) for row, text in prompts if row["_row"] not in done]
    if not todo:
        print(f"kotune: all {len(prompts)} rows are already in {output}; nothing to do")
        return 0
    if done:
        print(f"kotune: {len(prompts) - len(todo)} rows already in {output}; generating the other {len(todo)}")
    model, tokenizer = load_model(folder, args.base)
    write_generations(model, tokenizer, folder, todo, output, sampling_from(args), args)
    return 0


def write_generations(model, tokenizer, folder, todo, output: Path, sampling: Sampling, args) -> None:
    """Generate batch by batch; each finished batch is appended and flushed before the next starts."""
    import torch
    from tqdm.auto import tqdm

    from kotune.inference import completion_text, encode_prompt, folder_stop_ids, generate, pad_id

    stops = folder_stop_ids(folder, tokenizer, model)
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    output.parent.mkdir(parents=True, exist_ok=True)
    total = len(todo)
    with (
        output.open("a", encoding="utf-8") as f,
        tqdm(total=total, desc="generate", unit="row", file=sys.stderr) as bar,
    ):
        for start in range(0, total, args.batch_size):
            batch = todo[start : start + args.batch_size]
            ids = [encode_prompt(tokenizer, text) for _, text in batch]
            results = generate(model, ids, pad_id(tokenizer), stops, sampling, generator)
            for (row, _), result in zip(batch, results, strict=True):
                f.write(output_line(row, completion_text(tokenizer, result.ids), result.stopped))
            f.flush()
            bar.update(len(batch))
