"""The training loop: a thin, readable loop over plain PyTorch, multi-GPU through torchrun / accelerate launch.

One optimizer step = ``gradient_accumulation_steps`` micro-batches of ``micro_batch_size`` rows, whatever the
number of processes: N processes split those rows between them (balanced by tokens), so 1 and N GPUs train the
same steps on the same rows. The loss is the sum of token losses divided by the number of supervised tokens in
the whole step (all processes), so long and short rows weigh what they should whatever the accumulation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kotune import output
from kotune.config import Config, TrainConfig
from kotune.data.batching import collate, to_device
from kotune.data.examples import IGNORE, Example
from kotune.errors import KotuneError
from kotune.model.build import TrainingModel
from kotune.run_folder import BEST, CHECKPOINT_PREFIX
from kotune.security import inside
from kotune.training import dist, memory
from kotune.training.checkpoint import (
    latest_good,
    save_adapter,
)
from kotune.training.fsdp import is_sharded
from kotune.training.optim import build_optimizer, lr_at, skips_on_device
from kotune.training.order import DataOrder, feeds_packed, total_steps
from kotune.training.report import Reporter
from kotune.training.resume import save_checkpoint
from kotune.training.signals import Interrupted, StopOnSignal


class NonFiniteLoss(KotuneError, FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradient norm; the message names step and rows."""

    exit_code = 1


@dataclass
class RunState:
    step: int = 0
    """Optimizer steps done."""
    micro_step: int = 0
    """Micro-batches of the data order consumed (all processes together), which fixes the data position."""
    tokens: int = 0
    """Supervised tokens trained on, all ranks."""
    bad_steps: int = 0
    """Consecutive steps skipped for a non-finite loss or gradient norm."""
    skipped_steps: int = 0
    eval_pending: bool = False
    """A stop signal skipped the evaluation due at this step; a resume runs it first."""
    best_eval_loss: float | None = None
    best_step: int | None = None
    processes: int = 1
    """Processes that trained the steps so far (the last of them); a resume on another number is allowed."""
    history: list[dict] = field(default_factory=list)


@dataclass
class Pending:
    """A step whose numbers are on their way from the device to the host."""

    step: int
    micro_step: int
    """Where the step starts in the data order (names its rows if it turns out bad)."""
    lr: float
    numbers: torch.Tensor
    """float64 [loss, gradient norm, update applied, supervised tokens, input tokens of each process]."""
    copied: torch.cuda.Event | None
    """Recorded after the copy to the host: waiting on it waits for this step only, not for later ones."""

    @classmethod
    def on_its_way(cls, step: int, micro_step: int, lr: float, numbers: torch.Tensor) -> Pending:
        if numbers.device.type != "cuda":
            return cls(step, micro_step, lr, numbers, None)
        host = numbers.to("cpu", non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(step, micro_step, lr, host, copied)

    def read(self) -> list[float]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.numbers.tolist()


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens a batch feeds the model, padding not counted."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()


@torch.no_grad()
def evaluate(model, examples: list[Example], cfg: Config, pad_id: int, device, loss_fn) -> float:
    """Validation loss: token-mean over all supervised tokens of the validation rows (all ranks)."""
    model.eval()
    rank, world = dist.rank_and_world()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    size = cfg.train.micro_batch_size
    mine = examples[rank::world]
    chunks = [mine[i : i + size] for i in range(0, len(mine), size)]
    if is_sharded(model):  # as in training: every process runs as many passes, the extra ones weighted 0
        most = -(-len(examples[::world]) // size)
        chunks += [chunks[-1] if chunks else examples[:1]] * (most - len(chunks))
    for i, chunk in enumerate(chunks):
        weight = 1.0 if i * size < len(mine) else 0.0
        batch = collate(chunk, pad_id, cfg.train.pad_to_multiple_of)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(cfg, device):
            total[0] += loss_fn(model, batch).double() * weight
        total[1] += (batch["labels"][:, 1:] != IGNORE).sum() * weight
    dist.all_reduce_sum(total)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def autocast(cfg: Config, device):
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.model.compute_dtype)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda")


class Fit:
    """One training run's loop: steps, evaluations, checkpoints and the faults that stop it.

    Constructing it touches no file: the recipe clears leftovers and restores a checkpoint explicitly, and the
    loop saves through ``training.resume.save_checkpoint`` (the checkpoint protocol lives there).
    """

    def __init__(
        self,
        cfg: Config,
        model: TrainingModel,
        tokenizer,
        train: list[Example],
        validation: list[Example],
        output_dir: Path,
        fingerprint: dict | None = None,
    ):
        self.cfg, self.model, self.tokenizer = cfg, model.peft, tokenizer
        self.fingerprint = fingerprint
        """What this run trains on (``kotune.training.fingerprint``), written into every checkpoint."""
        self.val_rows = validation
        self.output_dir = output_dir
        self.rank, self.world = dist.rank_and_world()
        self.device = next(p for p in model.peft.parameters() if p.requires_grad).device
        self.loss_fn = model.loss_sum
        self.host_side = model.host_side
        self.ddp_model = dist.wrap(model.forward)
        self.sharded = is_sharded(model.forward)
        """FSDP (``kotune.training.fsdp``): every process runs the same number of passes."""
        # peft's get_peft_model sets training mode on its wrapper only; the layers stay in from_pretrained's
        # eval mode, where transformers skips gradient checkpointing and LoRA dropout is off
        self.ddp_model.train()
        self.optimizer = build_optimizer(model.peft, cfg.train, self.device)
        self.steps, _ = total_steps(cfg, [len(e.input_ids) for e in train], self.world)
        t = cfg.train
        packed = feeds_packed(t, model.fast is not None)
        self.order = DataOrder(train, cfg, self.rank, self.world, tokenizer.pad_token_id, packed)
        self.state = RunState(processes=self.world)
        self.saved_step: int | None = None
        self.pending: list[Pending] = []
        """Steps whose loss, gradient norm and token counts are still on the device (see ``settle``)."""
        self.settle_every_step = settles_each_step(self.device)

    # -- one optimizer step -----------------------------------------------------------------------
    def step(self) -> None:
        """Forward / backward over one accumulation window, clip, update; the step's numbers are copied to the
        host behind its work (``Pending``) and read by ``settle``, so a step by itself waits for the GPU nowhere
        (with an optimizer that ``skips_on_device``; the 8-bit ones need one read a step to decide on the
        update)."""
        cfg, model = self.cfg.train, self.ddp_model
        start = self.state.micro_step
        window = self.order.window(start)
        # [supervised tokens, input tokens of process 0, 1, ...]: one all-reduce gives the step's totals
        host_counts = [0.0] * (1 + self.world)
        host_counts[0] = float(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in window))
        host_counts[1 + self.rank] = float(sum(input_tokens(b) for b in window))
        counts = to_device(torch.tensor(host_counts, dtype=torch.float64), self.device)
        dist.all_reduce_sum(counts)
        n_tokens = counts[0].float()  # normalise by the supervised tokens of the whole step, all processes
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        weights = [1.0] * len(window)
        if self.sharded:  # a process with fewer passes repeats its last one, weighted 0, to gather with the others
            idle = self.order.most_passes(start) - len(window)
            window, weights = window + window[-1:] * idle, weights + [0.0] * idle
        for i, (batch, weight) in enumerate(zip(window, weights, strict=True)):
            batch = {k: to_device(v, self.device) for k, v in self.host_side(batch).items()}
            with dist.no_sync(model, last=i == len(window) - 1), autocast(self.cfg, self.device):
                loss = self.loss_fn(model, batch) * weight
                # DDP averages the processes' gradients; the step's gradient is their sum
                (loss * self.world / n_tokens.clamp(min=1)).backward()
            total += loss.detach().double()
        self.state.micro_step += cfg.gradient_accumulation_steps  # packing may feed them as fewer sequences
        dist.all_reduce_sum(total)
        loss = total / n_tokens.clamp(min=1)
        lr = lr_at(self.state.step, self.steps, cfg)
        grad_norm, finite = clip_and_update(self.model, self.optimizer, cfg, lr, loss)
        self.state.step += 1
        numbers = torch.cat([torch.stack([loss, grad_norm.double(), finite.double()]), counts])
        self.pending.append(Pending.on_its_way(self.state.step, start, lr, numbers))

    def settle(self, up_to: int) -> list[dict]:
        """Read the numbers of the steps up to ``up_to`` not read yet (waiting for those steps only), count
        their tokens and non-finite steps, and return their records; stops the run after ``max_bad_steps`` bad
        steps in a row."""
        ready = [p for p in self.pending if p.step <= up_to]
        self.pending = self.pending[len(ready) :]
        records = []
        for p in ready:
            loss, grad_norm, finite, supervised, *inputs = p.read()
            record = {
                "step": p.step,
                "loss": loss,
                "grad_norm": grad_norm,
                "lr": p.lr,
                "tokens": int(supervised),
                "skipped": not finite,
                "input_tokens": int(sum(inputs)),
                "epoch": (p.micro_step + self.cfg.train.gradient_accumulation_steps) / self.order.per_epoch,
            }
            if self.world > 1:
                record.update(processes=self.world, input_tokens_per_process=[int(c) for c in inputs])
            self.state.tokens += record["tokens"]
            self.state.bad_steps = 0 if finite else self.state.bad_steps + 1
            self.state.skipped_steps += not finite
            records.append(record)
            if not finite:
                output.warn(f"step {p.step}: non-finite loss or gradient norm; update skipped")
                if self.state.bad_steps >= self.cfg.train.max_bad_steps:
                    raise numerical_fault(self, record, p.micro_step)
        return records

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, stop: StopOnSignal | None = None) -> RunState:
        """Train to the last step; with ``stop``, a signal saves a checkpoint and raises Interrupted."""
        cfg = self.cfg.train
        self.reporter = Reporter(self.cfg, self.output_dir, self.rank == 0)
        progress = self.reporter.progress(self.steps, self.state.step)
        if (cfg.eval_at_start and self.val_rows and self.state.step == 0) or self.state.eval_pending:
            self._evaluate()
        window_start, window_tokens = time.perf_counter(), 0
        while self.state.step < self.steps:
            self.step()
            step = self.state.step
            eval_due = bool(self.val_rows) and (step % cfg.eval_steps == 0 or step == self.steps)
            save_due = step % cfg.save_steps == 0 or step == self.steps
            stop_due = stop is not None and step < self.steps and stop_requested(stop, self.device)
            # the previous step's numbers are read while this one runs: the GPU never waits for the host
            now = self.settle_every_step or eval_due or save_due or stop_due
            try:
                records = self.settle(step if now else step - 1)
            except NonFiniteLoss:
                progress.close()
                raise
            # records read together (one step behind, then the current one before an evaluation or a save) share
            # the window's rate: the time they took is known only together
            window_tokens += sum(record["tokens"] for record in records)
            elapsed = time.perf_counter() - window_start
            rate = window_tokens / elapsed if elapsed > 0 else 0.0
            for record in records:
                if record["step"] % cfg.logging_steps == 0 or record["step"] == self.steps:
                    record["tokens_per_s"] = rate
                    record["epoch"] = record.pop("epoch")  # after the rate, as metrics.jsonl has always had it
                    record.update(memory.peak())
                    self.reporter.log(record)
                    tok_s = f"{record['tokens_per_s']:.0f}"
                    progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=tok_s, **memory.now())
            if any("tokens_per_s" in record for record in records):
                window_start, window_tokens = time.perf_counter(), 0
            progress.update(1)
            if stop_due:
                progress.close()
                self._interrupt(stop)  # before this step's evaluation: a stop waits for one step, no more
            if eval_due:
                self._evaluate()
            if save_due:
                save_checkpoint(self)  # the last step too: a finished run can be extended with --resume
        progress.close()
        if self.state.step and self.state.skipped_steps == self.state.step:
            raise NonFiniteLoss(
                f"no update was applied: all {self.state.step} steps had a non-finite loss or gradient norm, so "
                "the adapter is untrained (none was written). Check the data (`kotune data audit`), or lower "
                f"train.learning_rate (now {cfg.learning_rate:g})"
            )
        return self.state

    def _evaluate(self) -> None:
        self.state.eval_pending = False
        eval_loss = evaluate(
            self.ddp_model, self.val_rows, self.cfg, self.tokenizer.pad_token_id, self.device, self.loss_fn
        )
        record = {"step": self.state.step, "eval_loss": eval_loss}
        if self.cfg.train.eval_generate and self.rank == 0:  # greedy replies: did it learn to stop, does it loop
            from kotune.evaluation.checks import training_checks

            record.update(training_checks(self.model, self.tokenizer, self.val_rows, self.cfg.train.eval_generate))
        self.reporter.log(record)
        if self.state.best_eval_loss is None or eval_loss < self.state.best_eval_loss:
            self.state.best_eval_loss, self.state.best_step = eval_loss, self.state.step
            if self.rank == 0:
                save_adapter(self.model, inside(self.output_dir, BEST))

    def _interrupt(self, stop: StopOnSignal):
        """Save a checkpoint at this step (unless one was just written) and raise Interrupted."""
        folder = self.output_dir / f"{CHECKPOINT_PREFIX}{self.state.step}"
        self.state.eval_pending = bool(self.val_rows) and self.state.step % self.cfg.train.eval_steps == 0
        if self.saved_step != self.state.step:
            folder = save_checkpoint(self)
        raise Interrupted(stop.signum, self.state.step, folder if self.rank == 0 else None)


def settles_each_step(device: torch.device) -> bool:
    """Whether every step's numbers are read right after it: off the GPU reading costs nothing; on it, a step's
    numbers are read during the next step (at once before an evaluation, a save or a stop), so logging and the
    count of non-finite steps run one step behind and the GPU always has the next step queued."""
    return device.type != "cuda"


def clip_and_update(model, optimizer, cfg: TrainConfig, lr: float, loss: torch.Tensor):
    """Clip the trained parameters' gradients, and update them unless the loss or the gradient norm is not
    finite; returns (gradient norm before clipping, update applied), both as device tensors.

    An optimizer that ``skips_on_device`` is handed the verdict as a tensor; any other needs it on the host.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if skips_on_device(optimizer):
        optimizer.found_inf = (~finite).float()
        optimizer.step()
    elif finite.item():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def stop_requested(stop: StopOnSignal, device) -> bool:
    """Whether a process got a stop signal; all processes must agree, or rank 0's save would wait forever."""
    if not dist.is_distributed():
        return stop.requested
    flag = torch.tensor(float(stop.requested), device=device)
    dist.all_reduce_sum(flag)
    return flag.item() > 0


def numerical_fault(fit: Fit, record: dict, start: int) -> NonFiniteLoss:
    """The error that stops a run after ``max_bad_steps`` bad steps (the last of them ``record``, starting at
    micro-batch ``start`` of the order): step, rows and what to try."""
    rows = sorted(fit.order.rows[i].row for i in fit.order.step_rows(start))
    good = latest_good(fit.output_dir, log=lambda _: None)
    kept = f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"
    t = fit.cfg.train
    return NonFiniteLoss(
        f"{fit.state.bad_steps} consecutive steps with a non-finite loss or gradient norm, the last at step "
        f"{record['step']} (loss {record['loss']}, grad_norm {record['grad_norm']}) on data rows {rows}; "
        f"{kept}. Check those rows (`kotune data audit`), or lower train.learning_rate "
        f"(now {t.learning_rate:g}, try {t.learning_rate / 4:g}); with compute_dtype float16 try bfloat16"
    )
