"""What the GPU benchmark scripts share: the cases, their data, result records.

The model is ``anchor_bench.py``'s (``../shared/gpu``, copied next to these scripts for the device run):
Llama-3-8B architecture, random bf16 weights, a word-level tokenizer where ``t<id>`` is token ``id``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL7 = QKVO + ["gate_proj", "up_proj", "down_proj"]
MODEL_DIR = os.environ.get("BENCH_MODEL_DIR", "/tmp/llama3-8b-rand")
"""anchor_bench.py's default folder (a tiny CPU model for dry runs through BENCH_MODEL_DIR)."""
V_ROWS, V_SEED = 4000, 0


@dataclass(frozen=True)
class Case:
    name: str
    seq: int | None
    """Fixed row length (S, A, L); None for the variable-length set (V, P)."""
    targets: list[str]
    dropout: float
    steps: int
    warm: int


CASES = {
    "S": Case("S", 2048, QKVO, 0.05, 6, 2),
    "A": Case("A", 2048, ALL7, 0.0, 6, 2),
    "L": Case("L", 4096, QKVO, 0.05, 2, 1),
    "V": Case("V", None, QKVO, 0.05, 0, 2),  # one epoch; steps follow from the rows
    "P": Case("P", None, QKVO, 0.0, 20, 0),  # same-maths check: 20 steps, dropout 0, same order as the seed
}


def anchor():
    """``anchor_bench`` (the shared baseline harness), imported from where the device run carries it."""
    here = Path(__file__).resolve().parent
    for folder in (here.parent / ".bench", here.parent.parent / "shared" / "gpu"):
        if (folder / "anchor_bench.py").is_file() and str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    import anchor_bench

    return anchor_bench


def fixed_rows(case: Case) -> list[dict]:
    """The anchor's own synthetic rows (random ids, first 30% masked), as many as its run uses."""
    n = (case.steps + case.warm) * 8
    return anchor().make_data(n, case.seq)


def emit(record: dict) -> None:
    """Print a result line; ``gpu_call.py`` collects ``RESULT`` lines from every script it runs."""
    print("RESULT " + json.dumps(record), flush=True)


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
