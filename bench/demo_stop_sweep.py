"""Which demo settings teach SmolLM2-135M-Instruct to stop: train, then count held-out replies that end with EOS.

    python bench/demo_stop_sweep.py MODEL.gguf NAME:key=value,key=value ...

Each NAME trains ``examples/ko-demo.yaml`` with its overrides through ``kotune.training.recipe.train`` (the plain path,
``train.kernels=off``, as on a CPU), then generates greedily (max 256 new tokens) for the 30 held-out prompts of
``data/ko-instruct-demo-heldout.jsonl`` through the adapter on its 4-bit base and through the merged model
(dequantized target, fp32), as ``kotune generate`` and ``kotune merge`` do. One ``RESULT`` JSON line per setting:
replies that stopped, median reply length, the final eval loss, seconds. Used on the GPU to choose the demo's
settings quickly; the chosen demo is then checked on the CPU by ``tests/test_generate.py``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "data" / "ko-instruct-demo-heldout.jsonl"
MAX_NEW_TOKENS = int(os.environ.get("SWEEP_MAX_NEW_TOKENS", "256"))  # smaller only for a smoke test


def as_messages(row: dict) -> dict:
    """An alpaca row as a two-turn conversation (instruction, then input after a blank line)."""
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}


def decodings() -> list[tuple[str, int, float]]:
    """(label, max new tokens, repetition penalty) of each way to generate: greedy at ``MAX_NEW_TOKENS``, and the
    variants in ``SWEEP_DECODINGS`` ("512:1.0,256:1.2", say)."""
    found = [("greedy", MAX_NEW_TOKENS, 1.0)]
    for spec in filter(None, os.environ.get("SWEEP_DECODINGS", "").split(",")):
        tokens, penalty = spec.split(":")
        found.append((f"t{tokens}_p{penalty}", int(tokens), float(penalty)))
    return found


def replies(model, tokenizer, folder, rows, max_new_tokens: int, penalty: float) -> list:
    from kotune.inference.generate import Sampling, encode_prompt, generate, pad_id, row_prompt
    from kotune.run_folder import folder_stop_ids

    if folder.fmt == "messages":
        rows = [{**as_messages(r), "_row": i} for i, r in enumerate(rows)]
    prompts = [encode_prompt(tokenizer, row_prompt(r, folder.fmt, folder, tokenizer, str(HELDOUT))) for r in rows]
    stops = folder_stop_ids(folder, tokenizer, model)
    sampling = Sampling(max_new_tokens=max_new_tokens, repetition_penalty=penalty)
    return generate(model, prompts, pad_id(tokenizer), stops, sampling)


def run(name: str, overrides: list[str], model_path: str, work: Path) -> dict:
    from kotune.config_load import load_config
    from kotune.export.merge import merged_model
    from kotune.inference.load import load_model
    from kotune.run_folder import open_folder
    from kotune.training.recipe import train

    start = time.perf_counter()
    out = work / name
    if "chat" in overrides:  # the demo rows as conversations through the model's own chat template
        work.mkdir(parents=True, exist_ok=True)
        chat = work / "ko-instruct-demo-messages.jsonl"
        rows = [json.loads(line) for line in (ROOT / "data" / "ko-instruct-demo.jsonl").read_text().splitlines()]
        chat.write_text("".join(json.dumps(as_messages(r), ensure_ascii=False) + "\n" for r in rows))
        overrides = [o for o in overrides if o != "chat"] + [f"data.path={chat}", "data.format=messages"]
    cfg = load_config(
        ROOT / "examples" / "ko-demo.yaml",
        [f"model.path={model_path}", f"train.output_dir={out}", "train.kernels=off", *overrides],
    )
    train(cfg)
    summary = json.loads((out / "run_summary.json").read_text()) if (out / "run_summary.json").exists() else {}
    rows = [json.loads(line) for line in HELDOUT.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[: int(os.environ.get("SWEEP_ROWS", len(rows)))]
    folder = open_folder(out)
    model, tokenizer = load_model(folder)
    record = {"name": name, "overrides": overrides, "eval_loss": summary.get("best_eval_loss")}
    for path, gen_model in (("adapter", model), ("merged", None)):
        if gen_model is None:
            del model
            gen_model = merged_model(folder, "dequantized", "fp32")
        for label, max_new_tokens, penalty in decodings():
            result = replies(gen_model, tokenizer, folder, rows, max_new_tokens, penalty)
            key = path if label == "greedy" else f"{path}_{label}"
            record[f"{key}_stopped"] = sum(r.stopped for r in result)
            record[f"{key}_median_len"] = statistics.median(len(r.ids) for r in result)
            if label == "greedy":
                record[f"{path}_first"] = tokenizer.decode(result[0].ids)[:60]
                record[f"{path}_unstopped"] = [tokenizer.decode(r.ids)[-80:] for r in result if not r.stopped][:3]
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def main() -> None:
    model_path, specs = sys.argv[1], sys.argv[2:]
    work = Path(os.environ.get("SWEEP_DIR", "/tmp/demo-sweep"))
    deadline = time.time() + float(os.environ.get("SWEEP_SECONDS", "480"))
    for spec in specs:
        if time.time() > deadline:
            print(f"SKIPPED {spec} (deadline)", flush=True)
            continue
        name, _, rest = spec.partition(":")
        overrides = [o for o in rest.split(",") if o]
        try:
            print("RESULT " + json.dumps(run(name, overrides, model_path, work), ensure_ascii=False), flush=True)
        except Exception as exc:  # one failing setting must not lose the others' results
            print(f"FAILED {name}: {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main()
