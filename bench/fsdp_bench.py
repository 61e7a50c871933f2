"""A Llama-3 base larger than one GPU: write it at random directly in 4-bit, then train it with ``kotune train``.

    python bench/fsdp_bench.py --shape 70b --folder /tmp/m70 --write --tokenizer DIR
    torchrun --standalone --nproc_per_node 2 bench/fsdp_bench.py --folder /tmp/m70 --train --steps 6 \
        --cap-gib 24 train.distributed=fsdp
    torchrun --standalone --nproc_per_node 2 bench/fsdp_bench.py --folder /tmp/m8 --train train.distributed=ddp

``--write`` puts the base (``kotune.model.prequantized.write_random_4bit``: NF4 with double quantization, as
transformers saves a 4-bit model; ~37 GB for 70B, never a bfloat16 copy) and the Llama-3 tokenizer files from
``--tokenizer`` (``kotune.model.assets.llama3_tokenizer_dir()`` on a machine with the network; carry them to one
without) in ``--folder``, and prints ``RESULT {"write_s": ...}``. ``--train`` runs ``kotune train`` in this process
(so each torchrun process is one kotune process) for ``--steps`` steps on the folder, the trailing ``key=value``
words passed through as overrides, after capping each process's CUDA memory at ``--cap-gib``. Process 0 prints
``RESULT {...}``: input tokens/s over the steps after the first (their durations from metrics.jsonl), the load time
(start to the first step), each process's peak allocated / reserved GiB over the whole run, and the loss per step,
so an FSDP run and a DDP run can be compared line by line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

LLAMA3 = {"vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001, "rms_norm_eps": 1e-5}
SHAPES = {  # hidden, intermediate, layers, attention heads, key/value heads
    "tiny": (256, 512, 2, 4, 2),  # for CPU checks of this script; the real vocabulary, so the tokenizer fits
    "8b": (4096, 14336, 32, 32, 8),
    "70b": (8192, 28672, 80, 64, 8),
}
TEMPLATE_TOKENS = 37
"""What the ko-alpaca template and EOS add to a fixed row's words under the Llama-3 tokenizer (measured)."""


def llama3_config(shape: str):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv_heads = SHAPES[shape]
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
        **LLAMA3,
    )


def write(args) -> dict:
    """The random 4-bit base and the tokenizer in ``args.folder``; how long it took and how big it is."""
    from kotune.model.prequantized import write_random_4bit

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    config = llama3_config(args.shape)
    folder = write_random_4bit(config, args.folder, seed=args.seed, device=device, quantized=args.bits == 4)
    write_s = time.perf_counter() - start
    if args.tokenizer:
        from kotune.run_folder import TOKENIZER_FILES

        copied = [name for name in TOKENIZER_FILES if (Path(args.tokenizer) / name).is_file()]
        if "tokenizer.json" not in copied:
            raise SystemExit(f"--tokenizer {args.tokenizer}: no tokenizer.json there (a Llama-3 tokenizer folder)")
        for name in copied:
            shutil.copy(Path(args.tokenizer) / name, folder / name)
    shards = sorted(folder.glob("*.safetensors"))
    return {
        "shape": args.shape,
        "bits": args.bits,
        "device": device,
        "write_s": round(write_s, 1),
        "files": len(shards),
        "gb": round(sum(p.stat().st_size for p in shards) / 1e9, 2),
        "tokenizer": bool(args.tokenizer),
    }


def fixed_rows(tokenizer_dir: Path, n: int, seq: int, seed: int) -> list[dict]:
    """``n`` alpaca rows of about ``seq`` tokens: words that are one Llama-3 token each (with their space), a
    quarter of them the instruction, the rest the response; ``seq`` within a token or two with the default
    ko-alpaca template (the first word of each part may be two tokens without its space)."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(tokenizer_dir).get_vocab()
    words = sorted(w[1:] for w in vocab if w.startswith("Ġ") and w[1:].isascii() and w[1:].isalpha() and len(w) > 3)
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        text = [rnd.choice(words) for _ in range(seq - TEMPLATE_TOKENS)]
        cut = len(text) // 4
        rows.append({"instruction": " ".join(text[:cut]), "input": "", "output": " ".join(text[cut:])})
    return rows


def training_data(args, path: Path) -> Path:
    """The rows file: ``fixed`` (about ``--seq`` tokens each) or ``v`` (bench/vdata.py's variable lengths)."""
    import vdata

    n = args.steps * args.rows_per_step
    rows = fixed_rows(args.folder, n, args.seq, args.seed) if args.data == "fixed" else vdata.rows(n, args.seed)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cap_memory(cap_gib: float) -> None:
    """Let this process's CUDA allocator use at most ``cap_gib`` of its card, as if the card were that small."""
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), device)


def track_peaks(peaks: dict) -> None:
    """Keep this process's peak allocated / reserved GiB over the whole run, and when its first step was logged.

    kotune's loop resets the CUDA peak counters at every logged step (``kotune.training.memory.peak``, which it
    calls through the module) and only process 0 writes them to metrics.jsonl; this bench wants every process's
    peak over the run, so it wraps that one function to keep the maximum and the time of its first call.
    """
    from kotune.training import memory

    inner = memory.peak

    def peak() -> dict[str, float]:
        figures = inner()
        peaks.setdefault("first_step_logged", time.perf_counter())
        keep_max(peaks, figures)
        return figures

    memory.peak = peak


def keep_max(peaks: dict, figures: dict[str, float]) -> None:
    for key, value in figures.items():
        peaks[key] = max(peaks.get(key, 0.0), value)


def train(args, overrides: list[str]) -> dict | None:
    """``kotune train`` on the folder in this process; process 0 returns the run's figures, the others None."""
    from kotune import cli
    from kotune.training import dist

    started = time.perf_counter()
    dist.init()  # kotune's own start; joining here first lets process 0 prepare the data and folder for all
    rank, world = dist.rank_and_world()
    if args.cap_gib and torch.cuda.is_available():
        cap_memory(args.cap_gib)
    out = Path(args.out)
    config = Path(f"{out}.yaml")
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        training_data(args, Path(f"{out}.jsonl"))
        config.write_text(json.dumps(run_config(args, out), indent=2), encoding="utf-8")  # JSON is YAML
    dist.barrier()
    peaks: dict = {}
    track_peaks(peaks)
    rc = cli.main(["train", str(config), *overrides, *(["--force"] if args.force else [])])
    if torch.cuda.is_available():  # what came after the last logged step (the adapter's save)
        gib = {
            "peak_allocated_gib": torch.cuda.max_memory_allocated(),
            "peak_reserved_gib": torch.cuda.max_memory_reserved(),
        }
        keep_max(peaks, {key: value / 2**30 for key, value in gib.items()})
    mine = {"rank": rank, "rc": rc, **{k: round(v, 2) for k, v in peaks.items() if k.startswith("peak")}}
    print(f"rank {rank}: {json.dumps(mine)}", flush=True)
    everyone = gather(mine)
    if rank != 0:
        return None
    return summarise(out, everyone, rc, peaks.get("first_step_logged", 0.0) - started, world, overrides)


def run_config(args, out: Path) -> dict:
    """The run's config before the overrides: every step logged (the figures come from metrics.jsonl), no
    evaluation, one row a micro-batch, ``--rows-per-step`` rows a step in all."""
    return {
        "model": {"path": str(args.folder)},
        "data": {"path": f"{out}.jsonl", "val_size": 0},
        "train": {
            "output_dir": str(out),
            "max_steps": args.steps,
            "logging_steps": 1,
            "micro_batch_size": 1,
            "gradient_accumulation_steps": args.rows_per_step,  # kotune splits a step's rows over the processes
        },
    }


def gather(mine: dict) -> list[dict]:
    """Every process's record, in rank order (just this one without a process group)."""
    import torch.distributed as torch_dist

    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return [mine]
    everyone = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(everyone, mine)
    return everyone


def summarise(out: Path, ranks: list[dict], rc: int, first_logged_s: float, world: int, overrides) -> dict:
    """The run's figures from its metrics.jsonl: a step's duration is its tokens over its tokens/s (one step a
    window, logging_steps 1); the load time is the start to the first step's logging, less that step."""
    metrics = out / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    steps = [r for r in records if "loss" in r and r.get("tokens_per_s")]
    seconds = [r["tokens"] / r["tokens_per_s"] for r in steps]
    timed, timed_s = steps[1:], sum(seconds[1:])
    return {
        "rc": rc,
        "processes": world,
        "overrides": overrides,
        "steps": len(steps),
        "input_tokens_per_s": round(sum(r["input_tokens"] for r in timed) / timed_s, 1) if timed_s else None,
        "s_per_step": round(timed_s / len(timed), 3) if timed else None,
        "load_s": round(first_logged_s - seconds[0], 1) if steps else None,
        "peaks": ranks,
        "losses": [round(r["loss"], 5) for r in steps],
        "input_tokens": [r["input_tokens"] for r in steps],
    }


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="70b", help="Llama-3 shape to write")
    ap.add_argument("--folder", required=True, help="the model folder written by --write and trained by --train")
    ap.add_argument("--write", action="store_true", help="write the random 4-bit base (and tokenizer) to --folder")
    ap.add_argument("--bits", type=int, choices=(4, 16), default=4, help="with --write: NF4 or bfloat16 weights")
    ap.add_argument("--tokenizer", help="with --write: a folder holding the Llama-3 tokenizer.json to copy in")
    ap.add_argument("--seed", type=int, default=0, help="of the weights and the rows")
    ap.add_argument("--train", action="store_true", help="run kotune train on --folder (under torchrun: each process)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps; the first is not timed")
    ap.add_argument("--rows-per-step", type=int, default=8, help="rows a step over all processes (micro-batch 1)")
    ap.add_argument(
        "--data",
        choices=["fixed", "v"],
        default="fixed",
        help="rows of about --seq tokens; or bench/vdata.py's (its words are 2-3 Llama-3 tokens)",
    )
    ap.add_argument("--seq", type=int, default=2048, help="tokens of a fixed row")
    ap.add_argument("--cap-gib", type=float, help="cap each process's CUDA memory at this many GiB")
    ap.add_argument("--out", default="/tmp/fsdp-bench-run", help="the run's output folder (emptied first)")
    ap.add_argument("--force", action="store_true", help="kotune train --force: start though the plan says no fit")
    args, overrides = ap.parse_known_args(argv)
    bad = [word for word in overrides if "=" not in word or word.startswith("-")]
    if bad:
        ap.error(f"not an option nor a key=value override: {' '.join(bad)}")
    if not (args.write or args.train):
        ap.error("nothing to do: give --write, --train or both")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.write and world > 1:
        ap.error("--write in one process first (python bench/fsdp_bench.py --write ...), then --train under torchrun")
    if args.rows_per_step % world:
        ap.error(f"--rows-per-step {args.rows_per_step} does not split over {world} processes")
    return args, overrides


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse(argv)
    if args.write:
        emit(write(args))
    if args.train:
        record = train(args, overrides)
        if record is not None:
            emit(record)


if __name__ == "__main__":
    main()
