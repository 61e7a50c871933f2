"""``kotune train``: the walkthrough's steps composed from kotune's parts.

read data -> template -> tokenize + mask -> 4-bit base + LoRA -> train (eval / save every N) -> save adapter.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kotune import dist
from kotune.assets import resolve_model
from kotune.config import Config
from kotune.model import load_for_training
from kotune.prepare import prepare
from kotune.train import Fit, find_resume, write_summary

CONFIG_FILE = "kotune_config.yaml"


def train(cfg: Config, resume: str | None = None) -> Path:
    """Run the whole job; returns the output folder holding the adapter."""
    dist.init()
    output_dir = Path(cfg.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(cfg.model.path)
    tokenizer, model = load_for_training(cfg, model_path)
    data = prepare(cfg, tokenizer)
    print(f"kotune: data ({data.format}): train {data.train_stats.summary()}")
    if data.validation_stats.rows:
        print(f"kotune: data: validation {data.validation_stats.summary()}")
    if not data.train:
        raise SystemExit("kotune: no training rows left after tokenization; run `kotune data audit` on the config")
    (output_dir / CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")
    fit = Fit(cfg, model, tokenizer, data.train, data.validation, output_dir, resume=find_resume(output_dir, resume))
    state = fit.run()
    if fit.rank == 0:
        save_final(fit, data.template, tokenizer, output_dir)
        write_summary(
            output_dir,
            state,
            {
                "train_rows": len(data.train),
                "validation_rows": len(data.validation),
                "skipped_rows": dict(data.train_stats.skipped),
                "truncated_rows": data.train_stats.truncated,
            },
        )
        print(f"kotune: adapter written to {output_dir}")
    return output_dir


def save_final(fit: Fit, template, tokenizer, output_dir: Path) -> None:
    """Adapter (safetensors), tokenizer and template; the best evaluated adapter when asked for."""
    best = output_dir / "best"
    fit.model.save_pretrained(output_dir, safe_serialization=True)
    if fit.cfg.train.load_best_model_at_end and fit.state.best_step is not None and best.is_dir():
        shutil.copy2(best / "adapter_model.safetensors", output_dir / "adapter_model.safetensors")
        print(f"kotune: kept the best adapter (step {fit.state.best_step}, eval_loss {fit.state.best_eval_loss:.4f})")
    tokenizer.save_pretrained(output_dir)
    template.save(output_dir)
