"""Data-parallel runs of ``kotune train`` through its CLI (``torchrun`` for 2+ GPUs) on the Llama-3-8B-shaped
anchor model and the V rows: tokens/s per GPU count and rows per step, and the per-step losses of 1 and N GPUs.

    python3 bench/ddp_scaling.py STEPS:ROWS_PER_STEP:GPUS [...]     # e.g. 24:8:1 24:8:2 8:64:1 8:64:2

Runs on the GPU machine from the project root with the wheels on PYTHONPATH and ``anchor_bench.py`` (from
``../shared/gpu``) in ``.bench/``. Each run is a fresh process group with the preset's defaults (fast path on,
micro-batch 1, packing auto) except ``gradient_accumulation_steps`` = rows per step and ``data.val_size=0``.
Input tokens/s = non-padding tokens fed over the wall time of the timed steps (after 3 warm-up steps), read from
``metrics.jsonl`` (each record's ``input_tokens`` and the logged step time); peak = ``nvidia-smi``'s largest
memory.used over the GPUs, polled every 0.2 s. Prints ``RESULT {...}`` per run and the loss agreement of each
N-GPU run with the 1-GPU run at the same rows per step; copies each run's metrics to $OUT.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / ".bench")]
import anchor_bench  # noqa: E402
import vdata  # noqa: E402

MODEL, DATA = "/tmp/llama3-8b-rand", Path("/tmp/v.jsonl")
WARM = 3


def peak_poller():
    peak, stop = [0], threading.Event()

    def poll():
        while not stop.is_set():
            query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
            out = subprocess.run(query, capture_output=True, text=True).stdout
            peak[0] = max([peak[0], *(int(x) for x in out.split() if x.isdigit())])
            time.sleep(0.2)

    threading.Thread(target=poll, daemon=True).start()
    return peak, stop


def run(steps: int, rows: int, gpus: int) -> dict:
    name = f"s{steps}-r{rows}-g{gpus}"
    out = Path(f"/tmp/run-{name}")
    shutil.rmtree(out, ignore_errors=True)
    config = Path(f"/tmp/{name}.yaml")
    config.write_text(f"model:\n  path: {MODEL}\ndata:\n  path: {DATA}\ntrain:\n  output_dir: {out}\n")
    args = ["train", str(config), f"train.max_steps={steps}", f"train.gradient_accumulation_steps={rows}"]
    args += ["data.val_size=0", "train.save_steps=1000", "train.warmup_steps=5"]
    if gpus == 1:
        command = [sys.executable, "-m", "kotune.cli", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
        command += ["-m", "kotune.cli", *args]
    peak, stop = peak_poller()
    start = time.time()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.time() - start
    stop.set()
    log = proc.stdout + proc.stderr
    outdir = Path(os.environ.get("OUT", "/tmp"))
    (outdir / f"log-{name}.txt").write_text(log[-20000:])
    metrics = out / "metrics.jsonl"
    records = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    if metrics.exists():
        shutil.copy(metrics, outdir / f"metrics-{name}.jsonl")
    train = [r for r in records if "loss" in r]
    timed = train[WARM:]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed if r.get("tokens_per_s"))
    result = {
        "name": name,
        "rc": proc.returncode,
        "gpus": gpus,
        "rows_per_step": rows,
        "steps": len(train),
        "wall_s": round(wall, 1),
        "input_tok_s": round(sum(r["input_tokens"] for r in timed) / seconds, 1) if seconds else None,
        "step_s": round(seconds / len(timed), 3) if timed else None,
        "peak_mib_nvsmi": peak[0],
        "losses": [round(r["loss"], 6) for r in train],
        "fast_path": [x for x in log.splitlines() if "fast path" in x][:1],
    }
    print("RESULT " + json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
    if proc.returncode:
        print(log[-3000:], flush=True)
    return result


def main() -> None:
    anchor_bench.build_model_dir(MODEL, 32)
    if not DATA.exists():
        vdata.write(DATA, 4000, 0)
    results = [run(*map(int, spec.split(":"))) for spec in sys.argv[1:]]
    single = {r["rows_per_step"]: r for r in results if r["gpus"] == 1}
    for r in results:
        base = single.get(r["rows_per_step"])
        if r["gpus"] == 1 or base is None or not r["losses"]:
            continue
        n = min(20, len(r["losses"]), len(base["losses"]))
        rel = max(abs(a - b) / abs(b) for a, b in zip(r["losses"][:n], base["losses"][:n], strict=True))
        speedup = r["input_tok_s"] / base["input_tok_s"] if r["input_tok_s"] and base["input_tok_s"] else None
        print(
            f"AGREE {r['name']} vs 1 GPU: first {n} step losses, max relative difference {rel:.2e}; "
            f"speed-up {speedup:.3f}x"
            if speedup
            else "",
            flush=True,
        )


if __name__ == "__main__":
    main()
