"""The checkpoint protocol of a run: find, check, restore and save; clear what an unfinished save left.

Each is an explicit call: ``find_resume`` and ``already_finished`` run before the model loads (with the
fingerprint check, ``training.fingerprint``); after the loop is built the recipe calls ``clear_leftovers``, then
``resume_from`` or ``start_metrics``; the loop calls ``save_checkpoint``. What a checkpoint folder holds and how it
is written atomically is ``training.checkpoint``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kotune import output, run_folder
from kotune.run_folder import METRICS, read_summary
from kotune.training import dist
from kotune.training.checkpoint import (
    CheckpointError,
    checkpoint_step,
    latest_good,
    list_checkpoints,
    prune,
    read_checkpoint,
    remove_partial,
    restore_best,
    restore_rng,
    trim_metrics,
    verify,
    write_checkpoint,
)


@dataclass
class RunState:
    """The loop's counters: what a checkpoint carries besides weights, optimizer and RNG."""

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


class Fit(Protocol):
    """What the protocol reads and restores of the loop (``training.loop.Fit``)."""

    cfg: Any
    model: Any
    objective: Any
    optimizer: Any
    state: RunState
    output_dir: Path
    fingerprint: dict | None
    rank: int
    world: int
    steps: int
    saved_step: int | None


def clear_leftovers(output_dir: Path) -> None:
    """Remove the temporary folders of saves that did not finish (first process only)."""
    for folder in remove_partial(output_dir):
        output.status(f"kotune: removed {folder.name}, left behind by a save that did not finish")


def start_metrics(output_dir: Path) -> None:
    """A fresh run starts ``metrics.jsonl`` afresh (first process only): drop an earlier run's records."""
    if trim_metrics(output_dir / METRICS, -1):
        output.warn(f"{output_dir / METRICS} held an earlier run's records; starting it afresh")


def find_resume(output_dir: Path, spec: str | None, log=output.info) -> Path | None:
    """``auto``: the newest complete checkpoint (None only if there is none at all); else the given folder."""
    if spec is None:
        return None
    if spec != "auto":
        folder = Path(spec)
        if not folder.is_dir():
            found = ", ".join(p.name for p in list_checkpoints(output_dir)) or "none"
            raise CheckpointError(
                f"--resume {spec}: no such checkpoint folder (checkpoints in {output_dir}: {found}); "
                "give a checkpoint-N folder, or a bare --resume for the newest"
            )
        verify(folder)
        return folder
    if not list_checkpoints(output_dir):
        log(f"kotune: no checkpoint in {output_dir} yet; starting from step 0")
        return None
    found = latest_good(output_dir, log)
    if found is None:
        raise CheckpointError(
            f"{output_dir}: every checkpoint is incomplete or corrupt (see above); "
            "refusing to start over silently. Move them away to start a new run"
        )
    return found


def already_finished(checkpoint: Path, output_dir: Path, steps: int, log=output.info) -> bool:
    """Whether resuming from ``checkpoint`` has nothing left to do: it is the end of a run whose adapter was written.

    A checkpoint at the last step without the run's summary (the final adapter write failed) is not finished:
    resuming writes the adapter. A checkpoint past the end is an error: the run cannot be shortened.
    """
    done = checkpoint_step(checkpoint)
    if done > steps:
        raise CheckpointError(
            f"{checkpoint} is at step {done}, past this config's end (step {steps}); a run cannot be shortened. "
            "Raise train.max_steps or train.num_epochs, or start a new run"
        )
    summary = read_summary(output_dir)
    if done < steps or summary is None or summary["steps"] != steps:
        return False
    log(
        f"kotune: {output_dir} is a finished run ({steps} steps, adapter written); nothing to do. To train further, "
        "resume with a larger train.max_steps or train.num_epochs"
    )
    return True


def write_summary(output_dir: Path, state: RunState, extra: dict) -> None:
    """``run_summary.json`` of a finished run: the loop's counters (``RunState``) and ``extra``."""
    summary = {
        "steps": state.step,
        "tokens": state.tokens,
        "skipped_steps": state.skipped_steps,
        "best_eval_loss": state.best_eval_loss,
        "best_step": state.best_step,
        **extra,
    }
    run_folder.write_summary(output_dir, summary)


def save_checkpoint(fit: Fit) -> Path | None:
    """Write ``checkpoint-STEP`` (rank 0) and prune old ones; the new one is verified first."""
    fit.saved_step = fit.state.step
    extra = fit.objective.checkpoint_tensors(fit.state.step)  # on every process: it may gather from all
    if fit.rank != 0:
        dist.barrier()
        return None
    state = dict(fit.state.__dict__)
    folder = write_checkpoint(
        fit.output_dir,
        fit.state.step,
        fit.model,
        fit.optimizer,
        state,
        fingerprint=fit.fingerprint,
        keep_free=int(fit.cfg.train.min_free_disk_gb * 1e9),
        objective=extra,
    )
    prune(fit.output_dir, fit.cfg.train.save_total_limit, protect={folder})
    dist.barrier()
    return folder


def resume_from(fit: Fit, folder: Path) -> None:
    """Restore adapter, optimizer, RNG, counters, the objective's state and best/ from ``folder``; drop metrics
    logged after it."""
    from peft import set_peft_model_state_dict

    adapter, optimizer_state, state = read_checkpoint(folder)
    set_peft_model_state_dict(fit.model, adapter)
    fit.optimizer.load_state_dict(optimizer_state)
    restore_rng(state.pop("rng_tensors"), state.pop("rng"))
    extra = state.pop("objective_tensors")
    for key, value in state.items():
        if hasattr(fit.state, key):
            setattr(fit.state, key, value)
    fit.objective.restore_tensors(extra, fit.state.step)
    if fit.state.processes != fit.world:  # the steps hold the same rows on any number of processes
        output.status(f"kotune: checkpoint written by {fit.state.processes} process(es), resumed on {fit.world}")
        fit.state.processes = fit.world
    fit.saved_step = fit.state.step
    dropped = 0
    if fit.rank == 0:
        restore_best(folder, fit.output_dir)
        dropped = trim_metrics(fit.output_dir / METRICS, fit.state.step)
    replay = f"; {dropped} metrics records after it will be logged again" if dropped else ""
    output.status(f"kotune: resumed from {folder} at step {fit.state.step} (of {fit.steps}){replay}")
