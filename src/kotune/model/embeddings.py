"""The audit's check that needs the base model's weights: special tokens the data uses whose input or output
embedding rows look untrained (near zero, or copies of each other), read straight from the safetensors files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kotune.data.audit import WARNING, AuditReport, Finding

EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
OUTPUT_NAMES = ("lm_head.weight", "embed_out.weight")


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a model folder."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    from safetensors import safe_open

    names: dict[str, Path] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            names.update({name: file for name in f.keys()})
    return names


def untrained_rows(matrix_rows: dict[int, Any], sample: Any) -> dict[int, str]:
    """Rows that look untrained next to a sample of ordinary rows: near zero, or identical to another."""
    import torch

    typical = float(sample.float().norm(dim=1).median())
    flagged: dict[int, str] = {}
    seen: dict[bytes, int] = {}
    for token, row in matrix_rows.items():
        norm = float(row.float().norm())
        if norm < 0.1 * typical:
            flagged[token] = f"norm {norm:.3g}, typical {typical:.3g}"
        key = row.to(torch.float32).numpy().tobytes()
        if key in seen:
            flagged.setdefault(token, f"identical to token {seen[key]}")
            flagged.setdefault(seen[key], f"identical to token {token}")
        seen.setdefault(key, token)
    return flagged


def check_embeddings(model_path: str, token_ids: list[int], tokenizer) -> Finding | None:
    """A warning naming the special tokens whose input / output embedding rows look untrained (None if none)."""
    from safetensors import safe_open

    model_dir = Path(model_path)
    files = _weight_files(model_dir) if model_dir.is_dir() else {}
    flagged: dict[int, str] = {}
    for suffixes in (EMBEDDING_NAMES, OUTPUT_NAMES):
        name = next((n for n in files if n.endswith(suffixes)), None)
        if name is None or not token_ids:
            continue
        with safe_open(files[name], framework="pt") as f:
            matrix = f.get_slice(name)
            size = min(matrix.get_shape()[0], tokenizer.vocab_size)
            starts = np.linspace(0, max(0, size - 64), 8).astype(int)
            import torch

            sample = torch.cat([matrix[int(s) : int(s) + 64] for s in starts])
            rows = {t: matrix[t : t + 1][0] for t in token_ids if t < matrix.get_shape()[0]}
        for token, why in untrained_rows(rows, sample).items():
            flagged.setdefault(token, f"{name}: {why}")
    if not flagged:
        return None
    names = ", ".join(f"{tokenizer.convert_ids_to_tokens(t)} ({why})" for t, why in sorted(flagged.items()))
    return Finding(
        "untrained_special_tokens",
        WARNING,
        f"special tokens the data uses look untrained in the base "
        f"model: {names}. The model must learn them from scratch through LoRA alone, which often fails "
        "(it never stops, or its gradients turn non-finite). Fix: lora.trainable_tokens=auto (trains those "
        "embedding rows too), or data.chat_template=plain (plain-text turn markers, turns end with EOS)",
        tokens=sorted(flagged),
    )


def add_model_checks(reports: tuple[AuditReport, ...], model_path: str, tokenizer) -> None:
    """Append what needs the base model's weights (untrained special-token embeddings) to each report."""
    for report in reports:
        finding = check_embeddings(model_path, report.special_ids, tokenizer)
        if finding is not None:
            report.findings.append(finding)


def untrained_token_ids(reports: tuple[AuditReport, ...]) -> list[int]:
    """Token ids that any report flags as untrained in the base model (``add_model_checks`` ran first)."""
    return sorted({t for r in reports for f in r.findings if f.code == "untrained_special_tokens" for t in f.tokens})
