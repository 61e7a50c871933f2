"""``kotune train``: the walkthrough's steps composed from kotune's parts.

read data -> template -> tokenize + mask -> 4-bit base + LoRA -> train (eval / save every N) -> save adapter.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

from kotune import output
from kotune.config import Config
from kotune.data.audit import AuditReport, fatal_error, summary_lines
from kotune.data.conversations import stop_ids
from kotune.data.examples import Example, unit_lengths
from kotune.data.order import describe, feeds_packed, total_steps, unit_config
from kotune.data.preference import UnpairedResponse
from kotune.data.prepare import Prepared, prepare
from kotune.data.prepare_pairs import prepare_pairs
from kotune.data.prompts import prepare_prompts
from kotune.data.read import DataError
from kotune.data.templates import Template, load_template
from kotune.errors import KotuneError
from kotune.evaluation.run_report import write_run_report
from kotune.hashing import model_identity
from kotune.model.assets import check_model_folder, resolve_model
from kotune.model.embeddings import add_model_checks, untrained_token_ids
from kotune.model.licence import warn_if_non_commercial
from kotune.model.load import load_tokenizer
from kotune.model.lora import check_adapter_base, check_target_modules, load_start_adapter, trainable_token_ids
from kotune.plan.gate import check_before_loading
from kotune.rl.rewards import RewardSet
from kotune.run_folder import ADAPTER, BEST, CONFIG, drop_blank_card, open_folder, save_run_tokenizer, save_template
from kotune.security import inside, redact, refuse_pickle
from kotune.training import dist, fingerprint
from kotune.training.build import TrainingModel, load_for_training
from kotune.training.checkpoint import CheckpointError, write_adapter
from kotune.training.claim import claim
from kotune.training.grpo import GrpoObjective
from kotune.training.loop import Fit, NonFiniteLoss
from kotune.training.objective import Objective, SupervisedObjective
from kotune.training.objectives import StartWeights
from kotune.training.preference import PreferenceObjective
from kotune.training.resume import (
    already_finished,
    clear_leftovers,
    find_resume,
    resume_from,
    start_metrics,
    write_summary,
)
from kotune.training.signals import StopOnSignal


class OutOfMemory(KotuneError, RuntimeError):
    """CUDA ran out of memory; the message names the settings to change and a smaller value to try."""

    exit_code = 1


def train(
    cfg: Config, resume: str | None = None, force: bool = False, overwrite: bool = False, fit_gpu: bool = False
) -> Path:
    """Run the whole job; returns the output folder holding the adapter.

    ``resume``: ``auto`` or a checkpoint folder; ``force`` resumes even if the fingerprint changed, and starts
    although the plan predicts the run does not fit the GPU; ``overwrite`` moves a run already in the output
    folder aside instead of refusing to start over it; ``fit_gpu`` picks the largest micro-batch that fits the GPU.
    """
    dist.init()
    output_dir = Path(cfg.train.output_dir)
    try:
        with claim(output_dir, resume is not None, overwrite) as aside:
            if aside is not None:
                output.info(f"kotune: moved the earlier run in {output_dir} to {aside} (--overwrite)")
            return _train(cfg, output_dir, resume, force, fit_gpu)
    except torch.cuda.OutOfMemoryError as exc:
        raise OutOfMemory(oom_advice(cfg)) from exc


def oom_advice(cfg: Config) -> str:
    """What to change after a CUDA out-of-memory: halve the micro-batch (same effective batch), else the cutoff."""
    d, t = cfg.data, cfg.train
    if t.micro_batch_size > 1:
        mbs, gas = t.micro_batch_size // 2, t.gradient_accumulation_steps * 2
        smaller = f"train.micro_batch_size={mbs} train.gradient_accumulation_steps={gas}"
        smaller += f" (effective batch {t.micro_batch_size * t.gradient_accumulation_steps} -> {mbs * gas})"
    else:
        smaller = f"data.cutoff_len={max(64, d.cutoff_len // 2)} (longer rows are cut; `kotune data audit` counts them)"
    if not cfg.model.gradient_checkpointing:
        smaller += ", or model.gradient_checkpointing=true"
    return (
        f"CUDA out of memory with data.cutoff_len={d.cutoff_len} and train.micro_batch_size={t.micro_batch_size} "
        f"(model.quantization={cfg.model.quantization}); try {smaller}. "
        "Checkpoints already written stay usable: rerun with --resume"
    )


@dataclass
class RunData:
    """What a run trains on, whatever its objective: the units (rows, or preference pairs), as ``Example`` rows
    too (for the fingerprint), the template, the audits and what the summary says of them."""

    train: Sequence
    validation: Sequence
    examples: tuple[Sequence[Example], Sequence[Example]]
    template: Template
    chat_template: str | None
    audits: tuple[AuditReport, ...]
    summary: dict
    format: str
    """The row format as detected (``preference`` for pairs), written into the saved config."""
    prepared: Prepared | None = None
    """SFT's prepared data."""
    rewards: RewardSet | None = None
    """GRPO's rewards."""

    @cached_property
    def lengths(self) -> list[int]:
        """Tokens each training unit feeds the model, read once a run: the plan, the resume check and the loop's
        order all use them (a streamed set has millions)."""
        return unit_lengths(self.train)


def _train(cfg: Config, output_dir: Path, resume: str | None, force: bool, fit_gpu: bool) -> Path:
    model_path = resolve_model(cfg.model.path)
    check_model_folder(model_path)
    warn_if_non_commercial(cfg.model.path)
    if Path(model_path).is_dir():
        refuse_pickle(model_path, cfg.model.allow_pickle, "model folder", "model.allow_pickle: true")
    # Tokenizer, data and its audit first: a data problem stops the run before the model loads.
    tokenizer = load_tokenizer(model_path, cfg.model)
    world = dist.rank_and_world()[1]
    data = run_data(cfg, model_path, tokenizer)
    if data.chat_template is not None:
        tokenizer.chat_template = data.chat_template  # saved with the adapter, so inference renders the same
    cfg, token_ids = plan_run(cfg, data, model_path, tokenizer, world, force, fit_gpu)
    fp = fingerprint.compute(cfg, tokenizer, data.template, *data.examples)
    folder = find_resume(output_dir, resume, log=output.info)
    if folder is not None:
        fingerprint.check_resume(folder, fp, force)
        steps = total_steps(unit_config(cfg), data.lengths, world)[0]
        if already_finished(folder, output_dir, steps, log=output.info):
            return output_dir
    check_target_modules(cfg, model_path)
    if cfg.model.adapter:
        check_adapter_base(cfg.model.adapter, model_path)
    model = load_for_training(cfg, model_path, token_ids)
    if cfg.model.adapter:
        load_start_adapter(model.peft, cfg.model.adapter)
        output.info(f"kotune: started from the adapter in {cfg.model.adapter}")
    if dist.is_main():
        saved = saved_config(cfg, data.format, data.chat_template)
        inside(output_dir, CONFIG).write_text(redact(saved.to_yaml()), encoding="utf-8")
    objective = objective_for(cfg, model, tokenizer, data)
    fit = Fit(cfg, model, objective, data.train, data.validation, output_dir, fp, lengths=data.lengths)
    ready_folder(fit, folder)  # after the objective: a resumed DPO run's reference is still its starting adapter
    with StopOnSignal() as stop:
        try:
            state = fit.run(stop)
        except NonFiniteLoss as exc:
            raise NonFiniteLoss(f"{exc}{untrained_tokens_hint(data.audits)}") from None
    if fit.rank == 0:
        save_final_or_say_how(fit, data.template, tokenizer, output_dir)
        audit = [line.removeprefix("kotune: ") for r in data.audits for line in summary_lines(r)]
        write_summary(output_dir, state, {**data.summary, "audit": audit, "base": model_identity(model_path)})
        output.info(f"kotune: adapter written to {output_dir}")
        output.info(f"kotune: run report written to {write_run_report(output_dir)}")
    return output_dir


def plan_run(cfg: Config, data: RunData, model_path: str, tokenizer, world: int, force: bool, fit_gpu: bool):
    """(the config to train with, embedding rows to train): SFT's untrained special tokens resolved, then the plan
    on the GPU (``--fit``, the refusal of a run that would not fit) for SFT and GRPO runs."""
    token_ids: list[int] = []
    if data.prepared is not None:
        token_ids = trainable_token_ids(cfg.lora, tokenizer, untrained_token_ids(data.audits))
        if cfg.lora.trainable_tokens == "auto":  # the saved config, fingerprint and fast-path choice see the result
            cfg = replace(cfg, lora=replace(cfg.lora, trainable_tokens=tokenizer.convert_ids_to_tokens(token_ids)))
    elif cfg.train.objective != "grpo":
        return cfg, token_ids
    if cfg.train.objective == "grpo" and cfg.train.distributed == "auto":  # sampling runs through the whole model
        cfg = replace(cfg, train=replace(cfg.train, distributed="ddp"))
    lengths = data.lengths  # GRPO: prompts; the plan adds completions and their KV cache
    cfg = check_before_loading(cfg, model_path, lengths, world, force, fit_gpu, output.info)
    output.info(describe(cfg, lengths, world))
    return cfg, token_ids


def run_data(cfg: Config, model_path: str, tokenizer) -> RunData:
    """The units the run's objective trains on: rows (SFT), pairs (preference) or prompts (GRPO)."""
    if cfg.train.objective == "sft":
        return sft_data(cfg, model_path, tokenizer)
    return prompt_data(cfg, tokenizer) if cfg.train.objective == "grpo" else pair_data(cfg, tokenizer)


def sft_data(cfg: Config, model_path: str, tokenizer) -> RunData:
    """The rows of an SFT run, tokenized (the first process fills the cache, the others read it) and audited."""
    with dist.main_first():
        data = prepare(cfg.data, tokenizer, log=output.info)
    audit_data(data.audits, model_path, tokenizer)
    output.info(f"kotune: data ({data.format}): train {data.train_stats.summary()}")
    if data.validation_stats.rows:
        output.info(f"kotune: data: validation {data.validation_stats.summary()}")
    if not data.train:
        raise DataError("no training rows left after tokenization; run `kotune data audit` on the config")
    summary = {
        "train_rows": len(data.train),
        "validation_rows": len(data.validation),
        "skipped_rows": dict(data.train_stats.skipped),
        "truncated_rows": data.train_stats.truncated,
    }
    examples = (data.train, data.validation)
    return RunData(*examples, examples, data.template, data.chat_template, data.audits, summary, data.format, data)


def pair_data(cfg: Config, tokenizer) -> RunData:
    """The pairs (or unpaired responses) of a preference run, encoded and audited."""
    data = prepare_pairs(cfg, tokenizer)
    audit_data(data.audits)
    if not data.train:
        raise DataError(f"no training {data.unit} left; run `kotune data audit` on the config")
    output.info(f"kotune: data (preference): {len(data.train)} train {data.unit}, {len(data.validation)} held out")
    summary = {
        "objective": cfg.train.objective,
        "train_pairs": len(data.train),
        "validation_pairs": len(data.validation),
    }
    examples = (data.examples("train"), data.examples("validation"))
    return RunData(
        data.train, data.validation, examples, data.template, data.chat_template, data.audits, summary, "preference"
    )


def prompt_data(cfg: Config, tokenizer) -> RunData:
    """The prompts of a GRPO run, encoded and audited; its rewards are loaded here, so a reward file that does not
    load stops the run before the model does."""
    data = prepare_prompts(cfg, tokenizer)
    audit_data(data.audits)
    rewards = RewardSet.from_config(cfg.grpo)
    if not data.train:
        raise DataError("no training prompts left; run `kotune data audit` on the config")
    output.info(f"kotune: data (prompts): {len(data.train)} train, {len(data.validation)} held out; rewards "
                f"{', '.join(f'{n} x{w:g}' for n, _, w in rewards.parts)}")  # fmt: skip
    summary = {"objective": "grpo", "train_prompts": len(data.train), "validation_prompts": len(data.validation)}
    examples = (data.examples("train"), data.examples("validation"))
    template = load_template(cfg.data.template)
    return RunData(data.train, data.validation, examples, template, data.chat_template, data.audits, summary,
                   "prompts", rewards=rewards)  # fmt: skip


def objective_for(cfg: Config, model: TrainingModel, tokenizer, data: RunData) -> Objective:
    """The run's objective over ``model`` (read before the first step: DPO keeps its starting weights)."""
    if cfg.train.objective == "sft":
        return SupervisedObjective(model, tokenizer, cfg, feeds_packed(cfg.train, model.fast is not None))
    start = StartWeights(model.peft) if cfg.model.adapter else None  # the reference is the start, not the base
    if cfg.train.objective == "grpo":
        stops = stop_ids(tokenizer, model.peft.generation_config, data.chat_template)
        return GrpoObjective(cfg, model.peft, tokenizer, data.rewards, stops, start, fast=model.fast is not None)
    unpaired = isinstance(data.train[0], UnpairedResponse)
    return PreferenceObjective(cfg, model.peft, tokenizer.pad_token_id, unpaired, model.fast is not None, start)


def ready_folder(fit: Fit, checkpoint: Path | None) -> None:
    """Before the first step: clear what an unfinished save left, then restore ``checkpoint`` or start the metrics
    log afresh."""
    if dist.is_main():
        clear_leftovers(fit.output_dir)
    if checkpoint is not None:
        resume_from(fit, checkpoint)
    elif dist.is_main():
        start_metrics(fit.output_dir)


def saved_config(cfg: Config, fmt: str, chat_template: str | None) -> Config:
    """The config written beside the adapter, readable without the training data or template files: the data
    format as detected (``fmt``), a chat template read from a file left to the tokenizer saved with the run (it
    holds ``chat_template``, the one rows were rendered with), so merge / chat / generate / push work on another
    machine, and local data paths made absolute, so merge finds the data from any working directory."""
    from kotune.data.conversations import BUILTIN_CHAT_TEMPLATES

    d = cfg.data
    kept = d.chat_template if chat_template is None or d.chat_template in BUILTIN_CHAT_TEMPLATES else None
    # merge reads the data again: relative local paths would only work from the folder training ran in
    paths = {"path": absolute_if_local(d.path), "validation_path": absolute_if_local(d.validation_path)}
    return replace(cfg, data=replace(d, format=fmt, chat_template=kept, **paths))


def absolute_if_local(path: str | None) -> str | None:
    """An existing local file or folder as an absolute path; a hub name (or nothing) unchanged."""
    return str(Path(path).resolve()) if path is not None and Path(path).exists() else path


def audit_data(audits: tuple[AuditReport, ...], model_path: str | None = None, tokenizer=None) -> None:
    """Print the data audit's summary (with the model's checks when ``model_path`` is given); a fatal problem
    raises DataError (the run stops before the model loads)."""
    if model_path is not None:
        add_model_checks(audits, model_path, tokenizer)
    for report in audits:
        for line in summary_lines(report):
            output.info(line)
    message = fatal_error(audits)
    if message is not None:
        raise DataError(f"{message}\nSee `kotune data audit` for the full report.")


def untrained_tokens_hint(audits: tuple[AuditReport, ...]) -> str:
    """The audit's finding on untrained special-token embeddings, a likely cause of non-finite steps ('' if none)."""
    found = [f.message for report in audits for f in report.findings if f.code == "untrained_special_tokens"]
    return f". Likely cause, from the data audit: {found[0]}" if found else ""


def save_final_or_say_how(fit: Fit, template, tokenizer, output_dir: Path) -> None:
    """``save_final``; a disk that fills up meanwhile is one error saying that the last checkpoint is whole and that
    ``--resume`` writes the final files again (the run is not finished until ``run_summary.json`` is written)."""
    try:
        save_final(fit, template, tokenizer, output_dir)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise CheckpointError(
            f"no space left on the disk while writing the run's final files in {output_dir} ({exc.strerror}); "
            f"the checkpoint at step {fit.state.step} is complete: free some space and run the same command with "
            "--resume, which writes them again"
        ) from None


def save_final(fit: Fit, template, tokenizer, output_dir: Path) -> None:
    """Adapter (safetensors, written atomically), tokenizer and template; the best evaluated adapter when asked for."""
    t = fit.cfg.train
    best = output_dir / BEST / ADAPTER
    keep_best = t.load_best_model_at_end and fit.state.best_step is not None and best.is_file()
    write_adapter(fit.model, output_dir, best if keep_best else None, keep_free=int(t.min_free_disk_gb * 1e9))
    if keep_best:
        output.info(
            f"kotune: kept the best adapter (step {fit.state.best_step}, eval_loss {fit.state.best_eval_loss:.4f})"
        )
    save_template(template, output_dir)
    save_run_tokenizer(open_folder(output_dir), tokenizer, fit.model)
    drop_blank_card(output_dir)  # peft's empty template card would be the folder's only README
