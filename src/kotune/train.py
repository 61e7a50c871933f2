"""The training loop: a thin, readable loop over plain PyTorch, multi-GPU through torchrun / accelerate launch.

One optimizer step = ``gradient_accumulation_steps`` micro-batches; the loss is the sum of token losses
divided by the number of supervised tokens in the whole step (on every rank), so long and short rows weigh
what they should whatever the accumulation.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kotune import dist
from kotune.checkpoint import latest_good, prune, read_checkpoint, restore_rng, write_checkpoint
from kotune.collate import collate, epoch_order, length_grouped_order
from kotune.config import Config
from kotune.encoding import IGNORE, Example
from kotune.optim import build_optimizer, lr_at
from kotune.report import Reporter


@dataclass
class RunState:
    step: int = 0
    """Optimizer steps done."""
    micro_step: int = 0
    """Micro-batches consumed (this rank), which fixes the data position."""
    tokens: int = 0
    """Supervised tokens trained on, all ranks."""
    bad_steps: int = 0
    """Consecutive steps skipped for a non-finite loss or gradient norm."""
    skipped_steps: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)


def loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over supervised positions, in float32."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1]
    keep = labels != IGNORE
    return torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")


def micro_batches(examples: list[Example], cfg: Config, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches (lists of example indices) for an epoch."""
    t = cfg.train
    if t.group_by_length:
        order = length_grouped_order([len(e.input_ids) for e in examples], t.seed, epoch, 64 * t.micro_batch_size)
    else:
        order = epoch_order(len(examples), t.seed, epoch)
    order = order[rank::world]
    size = t.micro_batch_size
    return [order[i : i + size] for i in range(0, len(order) - size + 1, size)]


def total_steps(cfg: Config, n_examples: int, world: int) -> tuple[int, int]:
    """(optimizer steps, micro-batches per epoch on one rank)."""
    per_epoch = n_examples // world // cfg.train.micro_batch_size
    if per_epoch == 0:
        raise ValueError(f"{n_examples} training rows are fewer than one micro-batch on each of {world} process(es)")
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps, per_epoch
    steps = math.floor(per_epoch * cfg.train.num_epochs / cfg.train.gradient_accumulation_steps)
    return max(1, steps), per_epoch


@torch.no_grad()
def evaluate(model, examples: list[Example], cfg: Config, pad_id: int, device) -> float:
    """Validation loss: token-mean over all supervised tokens of the validation rows (all ranks)."""
    model.eval()
    rank, world = dist.rank_and_world()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    mine = examples[rank::world]
    for i in range(0, len(mine), cfg.train.micro_batch_size):
        batch = collate(mine[i : i + cfg.train.micro_batch_size], pad_id, cfg.train.pad_to_multiple_of)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(cfg, device):
            total[0] += loss_sum(model, batch).double()
        total[1] += (batch["labels"][:, 1:] != IGNORE).sum()
    dist.all_reduce_sum(total)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def autocast(cfg: Config, device):
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.model.compute_dtype)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda")


class Fit:
    """One training run: the loop plus what it needs around it (data order, checkpoints, logging)."""

    def __init__(
        self,
        cfg: Config,
        model,
        tokenizer,
        train: list[Example],
        validation: list[Example],
        output_dir: Path,
        resume: Path | None = None,
    ):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.train_rows, self.val_rows = train, validation
        self.output_dir = output_dir
        self.rank, self.world = dist.rank_and_world()
        self.device = next(p for p in model.parameters() if p.requires_grad).device
        self.ddp_model = dist.wrap(model)
        self.optimizer = build_optimizer(model, cfg.train, self.device)
        self.steps, self.per_epoch = total_steps(cfg, len(train), self.world)
        self.state = RunState()
        self.reporter = Reporter(cfg, output_dir, self.rank == 0)
        if resume is not None:
            self._resume(resume)

    # -- data -------------------------------------------------------------------------------------
    def _window(self, micro_step: int) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of the optimizer step that starts at ``micro_step``."""
        batches = []
        for m in range(micro_step, micro_step + self.cfg.train.gradient_accumulation_steps):
            epoch, index = divmod(m, self.per_epoch)
            ids = self._epoch_batches(epoch)[index]
            batches.append(
                collate(
                    [self.train_rows[i] for i in ids], self.tokenizer.pad_token_id, self.cfg.train.pad_to_multiple_of
                )
            )
        return batches

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if getattr(self, "_cached_epoch", None) != epoch:
            self._cached_epoch = epoch
            self._cached = micro_batches(self.train_rows, self.cfg, epoch, self.rank, self.world)
        return self._cached

    # -- one optimizer step -----------------------------------------------------------------------
    def step(self) -> dict:
        """Forward / backward over one accumulation window, clip, check finiteness, update."""
        cfg, model = self.cfg.train, self.ddp_model
        window = self._window(self.state.micro_step)
        n_tokens = torch.tensor(float(sum((b["labels"][:, 1:] != IGNORE).sum() for b in window)), device=self.device)
        dist.all_reduce_sum(n_tokens)  # normalise by the supervised tokens of the whole step, all ranks
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(window):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with dist.no_sync(model, last=i == len(window) - 1), autocast(self.cfg, self.device):
                loss = loss_sum(model, batch)
                (loss / n_tokens.clamp(min=1)).backward()
            total += loss.detach().double()
        self.state.micro_step += len(window)
        dist.all_reduce_sum(total)
        loss_value = (total / n_tokens.clamp(min=1)).item()
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        lr = lr_at(self.state.step, self.steps, cfg)
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.state.bad_steps = 0
        else:
            self.state.bad_steps += 1
            self.state.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens += int(n_tokens.item())
        return {
            "step": self.state.step,
            "loss": loss_value,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": int(n_tokens.item()),
            "skipped": not finite,
        }

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> RunState:
        cfg = self.cfg.train
        progress = self.reporter.progress(self.steps, self.state.step)
        window_start, window_tokens = time.perf_counter(), 0
        while self.state.step < self.steps:
            record = self.step()
            window_tokens += record["tokens"]
            if record["skipped"]:
                self.reporter.warn(f"step {record['step']}: non-finite loss or gradient norm; update skipped")
                if self.state.bad_steps >= cfg.max_bad_steps:
                    raise FloatingPointError(
                        f"{self.state.bad_steps} consecutive steps with a non-finite loss or gradient norm "
                        f"(last at step {record['step']}); lower train.learning_rate or check the data"
                    )
            if self.state.step % cfg.logging_steps == 0 or self.state.step == self.steps:
                elapsed = time.perf_counter() - window_start
                record["tokens_per_s"] = window_tokens / elapsed if elapsed > 0 else 0.0
                record["epoch"] = self.state.micro_step / self.per_epoch
                self.reporter.log(record)
                progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                window_start, window_tokens = time.perf_counter(), 0
            progress.update(1)
            if self.val_rows and (self.state.step % cfg.eval_steps == 0 or self.state.step == self.steps):
                self._evaluate()
            if self.state.step % cfg.save_steps == 0 and self.state.step < self.steps:
                self.save_checkpoint()
        progress.close()
        return self.state

    def _evaluate(self) -> None:
        eval_loss = evaluate(self.ddp_model, self.val_rows, self.cfg, self.tokenizer.pad_token_id, self.device)
        self.reporter.log({"step": self.state.step, "eval_loss": eval_loss})
        if self.state.best_eval_loss is None or eval_loss < self.state.best_eval_loss:
            self.state.best_eval_loss, self.state.best_step = eval_loss, self.state.step
            if self.rank == 0:
                self.model.save_pretrained(self.output_dir / "best", safe_serialization=True)

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        if self.rank != 0:
            dist.barrier()
            return None
        state = {k: v for k, v in self.state.__dict__.items() if k != "history"}
        folder = write_checkpoint(self.output_dir, self.state.step, self.model, self.optimizer, state)
        prune(self.output_dir, self.cfg.train.save_total_limit, protect={folder})
        dist.barrier()
        return folder

    def _resume(self, folder: Path) -> None:
        from peft import set_peft_model_state_dict

        adapter, optimizer_state, state = read_checkpoint(folder)
        set_peft_model_state_dict(self.model, adapter)
        self.optimizer.load_state_dict(optimizer_state)
        restore_rng(state.pop("rng_tensors"), state.pop("rng"))
        for key, value in state.items():
            if hasattr(self.state, key):
                setattr(self.state, key, value)
        self.reporter.info(f"resumed from {folder} at step {self.state.step}")


def find_resume(output_dir: Path, spec: str | None) -> Path | None:
    """``auto``: the newest complete checkpoint (None if there is none); else the given folder."""
    if spec is None:
        return None
    if spec == "auto":
        return latest_good(output_dir)
    return Path(spec)


def write_summary(output_dir: Path, state: RunState, extra: dict) -> None:
    summary = {
        "steps": state.step,
        "tokens": state.tokens,
        "skipped_steps": state.skipped_steps,
        "best_eval_loss": state.best_eval_loss,
        "best_step": state.best_step,
        **extra,
    }
    (output_dir / "run_summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
