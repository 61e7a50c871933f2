"""The benchmark's table from ``results.jsonl``: each kotune figure with its ratio to the baselines of the same call.

python bench/table.py RESULTS.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _baseline(records: list[dict], case: str, tool: str) -> dict | None:
    found = [r for r in records if r.get("case") == case and r.get("tool") == tool and r.get("tokens_per_s")]
    return found[-1] if found else None


def _ratio(value, base) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def throughput_rows(records: list[dict]) -> list[str]:
    lines = ["| case | tool | variant | tokens/s | peak GiB | vs seed tok/s | vs unsloth tok/s | vs unsloth peak |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in records:
        if r.get("case") in ("P",) or not r.get("tokens_per_s"):
            continue
        seed, unsloth = _baseline(records, r["case"], "seed"), _baseline(records, r["case"], "unsloth")
        peak = r.get("peak_gib") or r.get("peak_train_gib")
        lines.append(
            f"| {r['case']} | {r['tool']} | {r.get('variant', '-')} | {r['tokens_per_s']:,.0f} | {peak} | "
            f"{_ratio(r['tokens_per_s'], seed and seed['tokens_per_s'])} | "
            f"{_ratio(r['tokens_per_s'], unsloth and unsloth['tokens_per_s'])} | "
            f"{_ratio(peak, unsloth and (unsloth.get('peak_gib') or unsloth.get('peak_train_gib')))} |"
        )
    return lines


def epoch_estimate(seed: dict, total_tokens: int, total_steps: int, warm: int) -> float:
    """Seed epoch seconds from its timed steps: least-squares ``seconds = a + b * tokens`` per step, summed."""
    xs, ys = seed["step_tokens"][warm:], seed["step_s"][warm:]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    return a * total_steps + b * total_tokens


def epoch_rows(records: list[dict]) -> list[str]:
    kot = [r for r in records if r.get("case") == "V" and r.get("tool") == "kotune"]
    seed = _baseline(records, "V", "seed")
    if not kot or not seed:
        return []
    k = kot[-1]
    n = seed["steps"]
    same_rows_k = sum(k["step_s"][:n])
    estimate = epoch_estimate(seed, sum(k["step_tokens"]), k["steps"], warm=2)
    return [
        f"V: kotune epoch {k['wall_s']:.0f} s over {k['steps']} steps ({sum(k['step_tokens']):,} tokens); "
        f"first {n} steps: kotune {same_rows_k:.1f} s, seed {seed['wall_s']:.1f} s "
        f"({seed['wall_s'] / same_rows_k:.2f}x); seed epoch estimated {estimate:.0f} s "
        f"({estimate / k['wall_s']:.2f}x kotune's)"
    ]


def parity_rows(records: list[dict]) -> list[str]:
    kot = [r for r in records if r.get("case") == "P" and r.get("tool") == "kotune"]
    seed = [r for r in records if r.get("case") == "P" and r.get("tool") == "seed"]
    if not kot or not seed:
        return []
    a, b = kot[-1]["losses"], seed[-1]["losses"]
    rel = [abs(x - y) / abs(y) for x, y in zip(a, b, strict=False)]
    return [
        f"P: {len(rel)} steps compared, max relative loss difference {max(rel):.2e} (step {rel.index(max(rel)) + 1})",
        "P kotune: " + " ".join(f"{x:.4f}" for x in a),
        "P seed:   " + " ".join(f"{x:.4f}" for x in b),
    ]


def main() -> None:
    records = load(Path(sys.argv[1]))
    gpus = sorted({r.get("gpu", "?") for r in records})
    print(f"GPU(s) in these records: {', '.join(gpus)}")
    print("\n".join(throughput_rows(records) + epoch_rows(records) + parity_rows(records)))


if __name__ == "__main__":
    main()
