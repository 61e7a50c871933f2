"""Fit ``kotune.plan.estimate``'s coefficients to measured runs, and print the accuracy table.

    python bench/fit_plan.py bench/results/plan_grid_2026-11-30.txt            # fit, then check every setting
    python bench/fit_plan.py --check bench/results/plan_check_2026-11-30.txt   # check only: predicted vs measured

Input: ``RESULT`` lines of ``bench/plan_grid.py`` (one H200, the Llama-3-8B shape, fast path). Each setting's
steps hold passes of one shape, so a pass's time is the step's over its pass count. The check uses the
predictions each record carries (made by the code as it stood when that call ran, before the steps ran); records
without them (the fit's own grid, run before the estimator existed) are predicted with the coefficients as coded.

- Memory: ``measured peak - (weights + LoRA state)`` = OMEGA x largest bf16 linear weight + KAPPA x per-token bytes
  x pass tokens, by least squares over all settings.
- Time: a pass takes max(LAUNCH x layers, A x linear FLOPs / peak + B x attention FLOPs / peak + C); the four
  coefficients minimise the squared relative error of every setting's pass time (Nelder-Mead; the max() makes
  the fit non-linear).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from kotune.plan import estimate as est  # noqa: E402
from kotune.plan.gpus import GiB, gpu_named  # noqa: E402
from kotune.plan.shape import ModelShape  # noqa: E402

LLAMA3_8B = ModelShape(
    hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, tied_embeddings=False
)
"""The anchor model's shape (``anchor_bench.build_model_dir``)."""


def records(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.startswith("RESULT "):
                r = json.loads(line[len("RESULT ") :])
                if "seq" in r:
                    out.append(r)
    return out


def setting(r: dict):
    """(config, row lengths, passes) of a grid record of fixed-length rows, as plan_grid ran it."""
    from plan_grid import GRID, setting_config

    case, cfg = setting_config(r["case"], "/nonexistent", r["steps"]) if r["case"] in GRID else (None, None)
    if cfg is None or GRID[r["case"]][0] != r["seq"]:
        raise SystemExit(f"record {r['case']} does not match plan_grid.GRID")
    cfg.model.compute_dtype, cfg.train.optimizer = "bfloat16", "paged_adamw_8bit"  # as on the GPU (case_config
    # switches both for CPU dry runs, and this script runs on a CPU)
    lengths = [r["seq"]] * 8 * r["steps"]
    packed = r["packing"] == "on" or r["packing"] == "auto"
    return cfg, lengths, est.run_passes(lengths, cfg, packed=packed)


def static_bytes(cfg) -> int:
    parts = est.memory_parts(LLAMA3_8B, cfg, 0, fast=True)
    return sum(v for k, v in parts.items() if not k.startswith(("workspace", "activations")))


def fit(rows: list[dict]) -> None:
    largest = max(a * b for a, b in LLAMA3_8B.linear().values()) * 2
    per_token = 2 * (4 * LLAMA3_8B.hidden + 3 * LLAMA3_8B.intermediate)
    x, y = [], []
    for r in rows:
        cfg, _, passes = setting(r)
        x.append([largest, per_token * max(p.tokens for p in passes)])
        y.append(r["peak_gib"] * GiB - static_bytes(cfg))
    (omega, kappa), *_ = np.linalg.lstsq(np.array(x, float), np.array(y, float), rcond=None)
    print(f"OMEGA = {omega:.3f}, KAPPA = {kappa:.3f}")

    h200 = gpu_named("H200")
    per_pass = []
    for r in rows:
        cfg, _, passes = setting(r)
        p = passes[0]
        lora = LLAMA3_8B.lora_params(cfg.lora.target_modules, cfg.lora.r)
        lin = 6 * (LLAMA3_8B.linear_params() + lora) * p.tokens + 4 * LLAMA3_8B.vocab * LLAMA3_8B.hidden * p.tokens
        att = 8 * LLAMA3_8B.hidden * LLAMA3_8B.layers * p.square
        per_pass.append(
            (
                lin / (h200.bf16_tflops * 1e12),
                att / (h200.bf16_tflops * 1e12),
                r["s_per_step"] / (len(passes) / r["steps"]),
            )
        )
    t = np.array(per_pass)

    def predict(x):
        a, b, c, launch = x
        return np.maximum(launch * LLAMA3_8B.layers, a * t[:, 0] + b * t[:, 1] + c)

    # the max() makes the fit non-linear: minimise the squared relative error of every pass's time
    start = [1.5, 2.5, 0.05, t[:, 2].min() / LLAMA3_8B.layers]
    best = minimize(lambda x: float(np.sum((predict(x) / t[:, 2] - 1) ** 2)), start, method="Nelder-Mead",
                    options={"maxiter": 20000, "xatol": 1e-6, "fatol": 1e-10})  # fmt: skip
    a, b, c, launch = best.x
    print(f"A, B, C = {a:.2f}, {b:.2f}, {c:.3f}; LAUNCH = {launch:.4f}")


HEADER = (
    "| setting | row length | packing | LoRA targets | micro-batch | longest pass | peak measured | predicted | error "
    "| s/step measured | predicted | error |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def predictions(r: dict) -> tuple[float, float, int]:
    """(peak GiB, s/step, longest pass) as recorded in the run (predicted before it), else as coded now."""
    if "predicted_peak_gib" in r:
        return r["predicted_peak_gib"], r["predicted_s_per_step"], r["longest_pass_tokens"]
    cfg, lengths, passes = setting(r)
    plan = est.estimate(LLAMA3_8B, cfg, lengths, gpu_named("H200"), fast=True)
    timed = [est.pass_seconds(LLAMA3_8B, cfg, p, plan.gpu) for p in plan.passes if p.step >= 1]
    return plan.peak_bytes / GiB, sum(timed) / (plan.steps - 1), plan.longest.tokens


def check(rows: list[dict]) -> None:
    print(HEADER)
    worst_m = worst_t = 0.0
    for r in rows:
        pm, pt, longest = predictions(r)
        mm, mt = r["peak_gib"], r["s_per_step"]
        em, et = (pm - mm) / mm, (pt - mt) / mt
        worst_m, worst_t = max(worst_m, abs(em)), max(worst_t, abs(et))
        targets = "all 7" if r["targets"] == 7 else "q,k,v,o"
        seq = "V rows" if r["seq"] is None else f"{r['seq']:,}"
        print(
            f"| {r['case']} | {seq} | {r['packing']} | {targets} | {r['micro_batch']} | {longest:,} "
            f"| {mm:.2f} GiB | {pm:.2f} GiB | {em:+.1%} | {mt:.2f} | {pt:.2f} | {et:+.1%} |"
        )
    print(f"\nworst: memory {worst_m:.1%}, step time {worst_t:.1%}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--check", action="store_true", help="only compare the coded coefficients with the runs")
    args = ap.parse_args()
    rows = records(args.files)
    if not args.check:
        fit(rows)
    check(rows)


if __name__ == "__main__":
    main()
