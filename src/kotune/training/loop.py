"""The one training loop: every objective (``training.objective``) runs here, multi-GPU through torchrun /
accelerate launch, DDP or FSDP.

One optimizer step = ``gradient_accumulation_steps`` micro-batches of ``micro_batch_size`` units (rows, or
preference pairs), whatever the number of processes: N processes split those units between them (balanced by
tokens), so 1 and N GPUs train the same steps on the same units. The loss is the step's summed loss divided by
the objective's normaliser over the whole step (all processes): supervised tokens for SFT, so long and short rows
weigh what they should whatever the accumulation; pairs for a preference objective.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from kotune import output
from kotune.config import Config, TrainConfig
from kotune.data.batching import to_device
from kotune.data.examples import unit_lengths
from kotune.data.mixture import source_names
from kotune.data.order import DataOrder, feeds_packed, repeats, total_steps, unit_config
from kotune.errors import KotuneError
from kotune.run_folder import BEST, CHECKPOINT_PREFIX
from kotune.security import inside
from kotune.training import dist, memory
from kotune.training.build import TrainingModel
from kotune.training.checkpoint import latest_good, save_adapter
from kotune.training.objective import Objective, input_tokens, supervised_tokens
from kotune.training.optim import build_optimizer, lr_at, skips_on_device
from kotune.training.report import Reporter, Throughput, bar_figures
from kotune.training.resume import RunState, save_checkpoint
from kotune.training.signals import Interrupted, StopOnSignal


class NonFiniteLoss(KotuneError, FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradient norm; the message names step and rows."""

    exit_code = 1


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


def autocast(cfg: Config, device):
    """The compute dtype's autocast on CUDA (bfloat16 or float16); float32 and the CPU compute as they are."""
    half = cfg.model.compute_dtype != "float32" and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=cfg.model.torch_dtype() if half else None, enabled=half)


class Fit:
    """One training run's loop, for any objective: steps, evaluations, checkpoints and the faults that stop it.

    Constructing it touches no file: the recipe clears leftovers and restores a checkpoint explicitly, and the
    loop saves through ``training.resume.save_checkpoint`` (the checkpoint protocol lives there).
    """

    def __init__(
        self,
        cfg: Config,
        model: TrainingModel,
        objective: Objective,
        train: list,
        validation: list,
        output_dir: Path,
        fingerprint: dict | None = None,
        lengths: list[int] | None = None,
    ):
        self.cfg, self.model, self.objective = cfg, model.peft, objective
        self.fingerprint = fingerprint
        """What this run trains on (``kotune.training.fingerprint``), written into every checkpoint."""
        self.train_units, self.val_units = train, validation
        self.output_dir = output_dir
        self.rank, self.world = dist.rank_and_world()
        self.device = next(p for p in model.peft.parameters() if p.requires_grad).device
        self.forward = dist.wrap(model.forward)
        """The module a pass calls: the fast model or the peft model, wrapped for DDP / FSDP when distributed."""
        self.sharded = dist.is_sharded(model.forward)
        """FSDP (``kotune.training.fsdp``): every process runs the same number of passes."""
        # peft's get_peft_model sets training mode on its wrapper only; the layers stay in from_pretrained's
        # eval mode, where transformers skips gradient checkpointing and LoRA dropout is off
        self.forward.train()
        self.optimizer = build_optimizer(model.peft, cfg.train, self.device)
        order_cfg = unit_config(cfg)
        # balance a step's units over the processes by tokens; the recipe passes the lengths it planned with
        lengths = unit_lengths(train) if lengths is None else lengths
        self.steps, _ = total_steps(order_cfg, lengths, self.world)
        packed = feeds_packed(order_cfg.train, model.fast is not None)
        self.order = DataOrder(lengths, order_cfg, self.rank, self.world, packed)
        self.repeats = repeats(order_cfg)
        """Steps that train on one step's units (``grpo.iterations``): the data position moves after the last."""
        self.state = RunState(processes=self.world)
        self.saved_step: int | None = None
        self.pending: list[Pending] = []
        """Steps whose numbers are still on the device (see ``settle``)."""
        self.settle_every_step = settles_each_step(self.device)
        self.peaks = {1 + objective.extra_keys.index(k) for k in objective.max_keys}
        """Positions in ``_sums``'s vector of the extras reduced by their maximum."""

    # -- passes -----------------------------------------------------------------------------------
    def _sums(self, batches: list[tuple[dict, float]], train: bool, norm: torch.Tensor | None = None):
        """Run the passes (host batch, weight) and return this process's sums on the device: [summed loss, the
        objective's ``extra_keys``...]. Training passes backpropagate their loss / ``norm`` (the step's
        normaliser, all processes); DDP all-reduces the gradients on the last pass."""
        obj = self.objective
        sums = torch.zeros(1 + len(obj.extra_keys), dtype=torch.float64, device=self.device)
        for i, (batch, weight) in enumerate(batches):
            batch = obj.on_device(batch, self.device, train)
            sync = dist.no_sync(self.forward, last=i == len(batches) - 1) if train else contextlib.nullcontext()
            with sync, autocast(self.cfg, self.device):
                loss, extras = obj.pass_sums(self.forward, batch)
                loss = loss * weight
                if train:  # DDP averages the processes' gradients; the step's gradient is their sum
                    (loss * self.world / norm.clamp(min=1)).backward()
            sums[0] += loss.detach().double()
            for k, extra in enumerate(extras, start=1):
                if k in self.peaks:
                    sums[k] = torch.maximum(sums[k], extra.detach().double() * weight)
                else:
                    sums[k] += extra.detach().double() * weight
        return sums

    def _reduce(self, sums: torch.Tensor) -> None:
        """All processes' sums in place: added up, but the objective's ``max_keys``, whose maximum is taken."""
        if not self.peaks or not dist.is_distributed():
            dist.all_reduce_sum(sums)
            return
        peak = torch.zeros_like(sums, dtype=torch.bool)
        peak[sorted(self.peaks)] = True
        highest = torch.where(peak, sums, torch.zeros_like(sums))
        dist.all_reduce_max(highest)
        dist.all_reduce_sum(sums)
        sums.copy_(torch.where(peak, highest, sums))

    def _with_idle(self, batches: list[dict], most: int) -> list[tuple[dict, float]]:
        """``batches`` weighted 1; under FSDP a process with fewer than ``most`` passes repeats its last one,
        weighted 0, to gather every layer with the others."""
        weighted = [(b, 1.0) for b in batches]
        if self.sharded:
            weighted += [(batches[-1], 0.0)] * (most - len(batches))
        return weighted

    # -- one optimizer step -----------------------------------------------------------------------
    def step(self) -> None:
        """Forward / backward over one accumulation window, clip, update; the step's numbers are copied to the
        host behind its work (``Pending``) and read by ``settle``, so a step by itself waits for the GPU nowhere
        (with an optimizer that ``skips_on_device``; the 8-bit ones need one read a step to decide on the
        update)."""
        cfg, obj = self.cfg.train, self.objective
        start = self.state.micro_step
        obj.start_step(self.state.step)
        passes = [[self.train_units[i] for i in p] for p in self.order.passes(start)]
        obj.prepare(passes)
        batches = [obj.collate(units, True) for units in passes]
        # [normaliser, supervised tokens, input tokens of process 0, 1, ...]: one all-reduce gives the totals
        host_counts = [0.0] * (2 + self.world)
        host_counts[0] = sum(obj.normaliser(u, b) for u, b in zip(passes, batches, strict=True))
        host_counts[1] = float(sum(supervised_tokens(b) for b in batches))
        host_counts[2 + self.rank] = float(sum(input_tokens(b) for b in batches))
        counts = to_device(torch.tensor(host_counts, dtype=torch.float64), self.device)
        dist.all_reduce_sum(counts)
        norm = counts[0].float()  # the step's summed loss is divided by this, over all processes
        most = self.order.most_passes(start) if self.sharded else len(batches)
        sums = self._sums(self._with_idle(batches, most), True, norm)
        if (self.state.step + 1) % self.repeats == 0:  # a group's steps start at the same units
            self.state.micro_step += cfg.gradient_accumulation_steps  # packing may feed them as fewer sequences
        self._reduce(sums)
        loss = sums[0] / norm.clamp(min=1)
        lr = lr_at(self.state.step, self.steps, cfg)
        grad_norm, finite = clip_and_update(self.model, self.optimizer, cfg, lr, loss)
        self.state.step += 1
        numbers = torch.cat([torch.stack([loss, grad_norm.double(), finite.double()]), counts, sums[1:]])
        self.pending.append(Pending.on_its_way(self.state.step, start, lr, numbers))

    def settle(self, up_to: int) -> list[dict]:
        """Read the numbers of the steps up to ``up_to`` not read yet (waiting for those steps only), count
        their tokens and non-finite steps, and return their records; stops the run after ``max_bad_steps`` bad
        steps in a row."""
        ready = [p for p in self.pending if p.step <= up_to]
        self.pending = self.pending[len(ready) :]
        records = []
        extra_keys = self.objective.extra_keys
        for p in ready:
            loss, grad_norm, finite, units, supervised, *rest = p.read()
            inputs, extras = rest[: self.world], rest[self.world :]
            record = {
                "step": p.step,
                "loss": loss,
                "grad_norm": grad_norm,
                "lr": p.lr,
                "tokens": int(supervised),
                "skipped": not finite,
                "input_tokens": int(sum(inputs)),
                **self.objective.record(dict(zip(extra_keys, extras, strict=True)), units),
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
        if (cfg.eval_at_start and self.val_units and self.state.step == 0) or self.state.eval_pending:
            self._evaluate()
        speed = Throughput()
        while self.state.step < self.steps:
            self.step()
            step = self.state.step
            eval_due = bool(self.val_units) and (step % cfg.eval_steps == 0 or step == self.steps)
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
            # the window's rates: the time they took is known only together
            speed.add(records)
            rates = speed.rates()
            for record in records:
                if record["step"] % cfg.logging_steps == 0 or record["step"] == self.steps:
                    record.update(rates)
                    record["epoch"] = record.pop("epoch")  # after the rates, as metrics.jsonl has always had it
                    record.update(memory.peak())
                    self.reporter.log(record)
                    progress.set_postfix(**bar_figures(record), **memory.now())
            if any("tokens_per_s" in record for record in records):
                speed.restart()
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
                f"train.learning_rate (now {cfg.learning_rate:g}){self.objective.fault_hint}"
            )
        return self.state

    @torch.no_grad()
    def evaluate(self, units=None) -> dict:
        """The held-out record: the loss as a step's (summed loss / normaliser, over every held-out unit of all
        processes, or over ``units``) and the objective's metrics; each process takes every ``world``-th unit."""
        obj, size = self.objective, self.cfg.train.micro_batch_size
        units = self.val_units if units is None else units
        mine = units[self.rank :: self.world]
        passes = [(mine[i : i + size], 1.0) for i in range(0, len(mine), size)]
        if self.sharded:  # as in training: every process runs as many passes as the first, the extra ones idle
            most = -(-len(units[:: self.world]) // size)
            passes += [(passes[-1][0] if passes else units[:1], 0.0)] * (most - len(passes))
        weighted = [(obj.collate(units, False), weight) for units, weight in passes]
        self.forward.eval()
        sums = self._sums(weighted, False)
        self.forward.train()
        norm = sum(obj.normaliser(u, b) * w for (u, w), (b, _) in zip(passes, weighted, strict=True))
        totals = torch.cat([sums, torch.tensor([norm], dtype=torch.float64, device=self.device)])
        self._reduce(totals)
        _, *extras, units = totals.tolist()
        loss = (totals[0] / totals[-1].clamp(min=1)).item()
        return obj.eval_record(loss, dict(zip(obj.extra_keys, extras, strict=True)), units)

    def source_losses(self) -> dict[str, float]:
        """With held-out rows from several data sources: each source's held-out loss, ``eval_loss[name]``."""
        groups: dict[int, list] = {}
        for unit in self.val_units:
            groups.setdefault(getattr(unit, "source", 0), []).append(unit)
        if len(groups) < 2:
            return {}
        names = source_names(self.cfg.data)
        return {f"eval_loss[{names[s]}]": self.evaluate(units)["eval_loss"] for s, units in sorted(groups.items())}

    def _evaluate(self) -> None:
        self.state.eval_pending = False
        record = {"step": self.state.step, **self.evaluate(), **self.source_losses()}
        if self.rank == 0:
            record.update(self.objective.eval_extras(self.model, self.val_units))
        self.reporter.log(record)
        eval_loss = record["eval_loss"]
        if self.state.best_eval_loss is None or eval_loss < self.state.best_eval_loss:
            self.state.best_eval_loss, self.state.best_step = eval_loss, self.state.step
            if self.rank == 0:
                save_adapter(self.model, inside(self.output_dir, BEST))

    def _interrupt(self, stop: StopOnSignal):
        """Save a checkpoint at this step (unless one was just written) and raise Interrupted."""
        folder = self.output_dir / f"{CHECKPOINT_PREFIX}{self.state.step}"
        self.state.eval_pending = bool(self.val_units) and self.state.step % self.cfg.train.eval_steps == 0
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
    micro-batch ``start`` of the order): step, rows, the checkpoint to go on from and what to try."""
    rows = sorted(fit.train_units[i].row for i in fit.order.step_rows(start))
    t = fit.cfg.train
    first_bad = record["step"] - fit.state.bad_steps + 1
    return NonFiniteLoss(
        f"{fit.state.bad_steps} consecutive steps with a non-finite loss or gradient norm, the last at step "
        f"{record['step']} (loss {record['loss']}, grad_norm {record['grad_norm']}) on data rows {rows}; "
        f"{checkpoints_to_resume(fit.output_dir, first_bad, t.learning_rate / 4)}. Check those rows (`kotune data "
        f"audit`), or lower train.learning_rate (now {t.learning_rate:g}, try {t.learning_rate / 4:g})"
        f"{fit.objective.fault_hint}; with compute_dtype float16 try bfloat16"
    )


def checkpoints_to_resume(output_dir: Path, first_bad: int, lower_lr: float) -> str:
    """Which checkpoint to go on from after bad steps from ``first_bad`` on. Step ``s``'s checkpoint holds the
    weights step ``s + 1`` computed its loss with, so one at step ``first_bad - 1`` or later holds weights that gave
    a non-finite loss (diverged, or about to): the one to resume from is the newest before that."""
    newest = latest_good(output_dir, log=lambda _: None)
    sane = latest_good(output_dir, log=lambda _: None, before=first_bad - 1)
    if newest is None:
        return "no checkpoint was written yet"
    how = (
        f"resume from it with `--resume {sane} train.learning_rate={lower_lr:g} --force` (--force: a changed "
        "learning rate changes the run's fingerprint)"
    )
    if sane == newest:
        return f"the last good checkpoint is {newest}: {how}"
    said = f"the last checkpoint, {newest}, holds weights that gave a non-finite loss at step {first_bad}"
    return f"{said}; the last one before that is {sane}: {how}" if sane else f"{said}, and none was kept before it"
