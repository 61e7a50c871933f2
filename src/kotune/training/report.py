"""Run logging: a progress bar with loss, tokens/s and ETA; metrics.jsonl always; wandb / tensorboard on request."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from kotune import output
from kotune.config import Config, ConfigError
from kotune.run_folder import METRICS

PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}
"""The package each ``train.report_to`` logger imports (both come with ``pip install 'kotune[logging]'``)."""


class Throughput:
    """Tokens per second over the window since the last logged step, two ways: trained tokens (supervised, what
    the loss is normalised by; ``tokens_per_s``) and input tokens (fed to the model, padding not counted;
    ``input_tokens_per_s``), the figure peers and benchmarks report. A run whose prompts are long trains far fewer
    tokens than it feeds, so only the second compares with another tool's tokens/s."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.start, self.trained, self.fed = time.perf_counter(), 0, 0

    def add(self, records: list[dict]) -> None:
        """Count the steps' records read since the window started (logged or not: their time is in it)."""
        self.trained += sum(r["tokens"] for r in records)
        self.fed += sum(r["input_tokens"] for r in records)

    def rates(self) -> dict[str, float]:
        """``tokens_per_s`` and ``input_tokens_per_s`` of the window so far (0.0 for a window of no time)."""
        elapsed = time.perf_counter() - self.start
        if elapsed <= 0:
            return {"tokens_per_s": 0.0, "input_tokens_per_s": 0.0}
        return {"tokens_per_s": self.trained / elapsed, "input_tokens_per_s": self.fed / elapsed}


def bar_figures(record: dict) -> dict[str, str]:
    """What the progress bar shows of a logged step: its loss, then input tokens/s (comparable with other tools)
    beside trained tokens/s, each named so neither is read as the other."""
    return {
        "loss": f"{record['loss']:.4f}",
        "input_tok_s": f"{record['input_tokens_per_s']:.0f}",
        "trained_tok_s": f"{record['tokens_per_s']:.0f}",
    }


def check_loggers(cfg: Config) -> None:
    """Fail before anything loads if a logger in ``train.report_to`` is not installed, naming the extra."""
    import importlib.util

    missing = [name for name in cfg.train.report_to if importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        raise ConfigError(
            f"'train.report_to' asks for {', '.join(missing)}, which is not installed: "
            "pip install 'kotune[logging]' (or drop it from train.report_to; metrics.jsonl is always written)"
        )


class Reporter:
    def __init__(self, cfg: Config, output_dir: Path, main_process: bool):
        self.main = main_process
        self.metrics_path = output_dir / METRICS
        self.backends = []
        if main_process:
            for name in cfg.train.report_to:
                self.backends.append(_open_backend(name, cfg, output_dir))

    def progress(self, total: int, done: int):
        """A tqdm bar on a terminal; in a log (stderr not a terminal) a plain line every 5% of the run instead."""
        if self.main and not sys.stderr.isatty():
            return output.LineProgress(total, done, every=total // 20)
        return tqdm(
            total=total,
            initial=done,
            desc="train",
            unit="step",
            disable=not self.main,
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def log(self, record: dict) -> None:
        """Append one record to metrics.jsonl (flushed at once, so a crash loses nothing logged)."""
        if not self.main:
            return
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for backend in self.backends:
            backend(numbers, record["step"])
        if "eval_loss" in record:
            output.status(f"kotune: step {record['step']}: eval_loss {record['eval_loss']:.4f}")


def _open_backend(name: str, cfg: Config, output_dir: Path):
    if name == "wandb":
        import wandb

        if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
            os.environ["WANDB_MODE"] = "offline"  # no key: keep the run locally, sync later with `wandb sync`
        run = wandb.init(project="kotune", name=cfg.train.run_name, config=cfg.to_dict(), dir=str(output_dir))
        return lambda values, step: run.log(values, step=step)
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

        def write(values, step):
            for key, value in values.items():
                writer.add_scalar(key, value, step)
            writer.flush()

        return write
    raise ValueError(
        f"train.report_to: unknown logger '{name}'"
    )  # config.validate lets only report_to's choices through
