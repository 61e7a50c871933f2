"""One device call: check the stack, run the chosen stages (kotune and its baselines), print the table.

    python bench/gpu_call.py check pytest kotune:S,A,L:fast,unfused,resident plain:S seed:S unsloth:S \
        seedv:30 parity anchorv:unsloth:24:packing

Each stage is a subprocess; its output goes to ``$OUT/log.txt``, its ``RESULT`` lines (tagged with the case) to
``$OUT/results.jsonl``. Stages past the deadline are skipped (and say so), so the table always comes back.
Baselines: ``seed`` / ``unsloth`` run ``anchor_bench.py`` (``../shared/gpu``, carried in ``.bench/``) with the
case's shape; unsloth runs with its own wheel set on ``PYTHONPATH`` (``UNSLOTH_SITE``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import ALL7, CASES, QKVO  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/bench-out"))
DEADLINE = time.time() + float(os.environ.get("BENCH_SECONDS", "540"))
V_ROWS_FILE = "/tmp/v_rows.json"
INIT_FILE = "/tmp/p_init_adapter.safetensors"

CHECK = r"""
import importlib, torch, transformers, peft, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("transformers", transformers.__version__, "peft", peft.__version__, "triton", triton.__version__)
for name in ("bitsandbytes", "liger_kernel", "datasets"):
    try:
        m = importlib.import_module(name); print(name, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(name, "MISSING", exc)
from kotune.fast.attention import varlen_available
print("varlen attention:", varlen_available(torch.device("cuda")))
from kotune.fast.ops import liger_available
print("liger kernels:", liger_available())
"""


def anchor_args(case: str) -> list[str]:
    c = CASES[case]
    targets = ",".join(ALL7 if c.targets == ALL7 else QKVO)
    return [
        "--seq", str(c.seq), "--dropout", str(c.dropout), "--targets", targets,
        "--steps", str(c.steps), "--warm", str(c.warm),
    ]  # fmt: skip


def stage_commands(stage: str) -> list[tuple[str, list[str], dict]]:
    """(case tag, argv, extra environment) of each subprocess a stage runs."""
    py = sys.executable
    kind, _, rest = stage.partition(":")
    if kind == "check":
        return [("-", [py, "-c", CHECK], {})]
    if kind == "pytest":
        names = rest.split(",") if rest else ["*"]  # pytest[:attention,nf4]
        tests = sorted(str(p) for n in names for p in (HERE.parent / "tests").glob(f"test_fast_{n}.py"))
        return [("-", [py, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider", *tests], {})]
    if kind == "kotune":  # kotune:CASES[:VARIANTS[:profile]]
        cases, _, more = rest.partition(":")
        variants, _, profile = more.partition(":")
        argv = [py, str(HERE / "kotune_run.py"), "--cases", cases, "--variants", variants or "fast"]
        steps = ["--steps", os.environ["BENCH_STEPS"]] if os.environ.get("BENCH_STEPS") else []
        return [("-", argv + steps + (["--profile"] if profile else []), {})]
    if kind == "plain":
        return [("-", [py, str(HERE / "kotune_run.py"), "--cases", rest, "--plain"], {})]
    if kind in ("seed", "unsloth"):
        env = {"PYTHONPATH": os.environ.get("UNSLOTH_SITE", "/tmp/site-u")} if kind == "unsloth" else {}
        anchor = str(HERE.parent / ".bench" / "anchor_bench.py")
        return [(c, [py, anchor, "--tool", kind, *anchor_args(c)], env) for c in rest.split(",")]
    dump = ("-", [py, str(HERE / "kotune_run.py"), "--dump-v", V_ROWS_FILE], {})
    seed = [py, str(HERE / "seed_recipe.py"), "--rows", V_ROWS_FILE]
    if kind == "anchorv":  # anchorv:TOOL:STEPS[:packing]: anchor_v.py (unsloth / TRL) on the V rows
        tool, _, more = rest.partition(":")
        steps, _, packing = more.partition(":")
        env = {"PYTHONPATH": os.environ.get("UNSLOTH_SITE", "/tmp/site-u")}
        argv = [py, str(HERE.parent / ".bench" / "anchor_v.py"), "--rows", V_ROWS_FILE, "--tool", tool]
        return [dump, ("V", [*argv, "--steps", steps or "24", *(["--packing"] if packing else [])], env)]
    if kind == "seedv":
        return [dump, ("V", [*seed, "--steps", rest or "30", "--case", "V"], {})]
    if kind == "parity":
        p = CASES["P"]
        seed += ["--steps", str(p.steps), "--warm", "0", "--dropout", "0", "--case", "P", "--save-init", INIT_FILE]
        kot = [py, str(HERE / "kotune_run.py"), "--cases", "P", "--init", INIT_FILE]
        return [dump, ("P", seed, {}), ("-", kot, {})]
    raise SystemExit(f"unknown stage {stage!r}")


def run(tag: str, argv: list[str], env: dict, log) -> None:
    left = DEADLINE - time.time()
    header = f"\n===== {' '.join(argv[1:])[:300]} (left {left:.0f}s)\n"
    log.write(header)
    log.flush()
    print(header.strip(), flush=True)
    if left < 30:
        log.write("skipped: past the deadline\n")
        print("skipped: past the deadline", flush=True)
        return
    full_env = dict(os.environ, PYTHONUNBUFFERED="1")
    for key, value in env.items():
        full_env[key] = value + os.pathsep + full_env.get(key, "")
    start = time.time()
    try:
        proc = subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=left - 10)
        text, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text, code = (exc.stdout or "") + (exc.stderr or "") if isinstance(exc.stdout, str) else "", "timeout"
    log.write(text + f"\n[exit {code}, {time.time() - start:.0f}s]\n")
    log.flush()
    tail = [line for line in text.splitlines() if line.strip()][-6:]
    print("\n".join(tail) + f"\n[exit {code}, {time.time() - start:.0f}s]", flush=True)
    with open(OUT / "results.jsonl", "a", encoding="utf-8") as res:
        for line in text.splitlines():
            if line.startswith("RESULT "):
                record = json.loads(line[len("RESULT ") :])
                record.setdefault("case", tag)
                res.write(json.dumps(record) + "\n")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "log.txt", "a", encoding="utf-8") as log:
        for stage in sys.argv[1:]:
            for tag, argv, env in stage_commands(stage):
                run(tag, argv, env, log)
    if (OUT / "results.jsonl").is_file():
        subprocess.run([sys.executable, str(HERE / "table.py"), str(OUT / "results.jsonl")])


if __name__ == "__main__":
    main()
