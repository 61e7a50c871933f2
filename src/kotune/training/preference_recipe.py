"""``kotune train`` with a preference objective: read pairs, audit them, load the model (optionally from an SFT
run's adapter), train, and write the same run folder an SFT run writes."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from kotune import output
from kotune.config import Config
from kotune.data.audit import AuditReport, fatal_error, summary_lines
from kotune.data.preference import (
    PreferenceData,
    PreferencePair,
    UnpairedResponse,
    is_preference,
    is_unpaired,
    pair_examples,
    render_pairs,
)
from kotune.data.preference_audit import audit_pairs
from kotune.data.read import DataError, apply_columns, read_rows, split_indices
from kotune.data.templates import Template, load_template
from kotune.model.build import load_for_training
from kotune.model.lora import check_target_modules, load_start_adapter
from kotune.run_folder import CONFIG
from kotune.security import inside, redact
from kotune.training import dist, fingerprint
from kotune.training.objectives import StartWeights
from kotune.training.preference import PreferenceFit, pair_steps
from kotune.training.resume import already_finished, find_resume, write_summary
from kotune.training.signals import StopOnSignal


@dataclass
class PreparedPairs:
    train: list[PreferencePair | UnpairedResponse]
    validation: list[PreferencePair | UnpairedResponse]
    audits: tuple[AuditReport, ...]
    template: Template
    chat_template: str | None


def _source(spec: str, split: str, cfg: Config, template: Template, tokenizer) -> tuple[PreferenceData, AuditReport]:
    rows = apply_columns(read_rows(spec, split), cfg.data.columns, spec)
    unpaired = not is_preference(rows) and is_unpaired(rows)
    if cfg.data.format not in ("auto", "preference") or not (is_preference(rows) or unpaired):
        raise DataError(
            f"{spec}: train.objective={cfg.train.objective} needs preference rows: columns prompt (or instruction), "
            "chosen and rejected (for kto also prompt, completion and a true / false label); map yours with "
            "data.columns"
        )
    if unpaired and cfg.train.objective != "kto":
        raise DataError(
            f"{spec}: rows of prompt, completion and label are unpaired preference data, which only "
            f"train.objective=kto trains on ({cfg.train.objective} needs chosen and rejected responses of one prompt)"
        )
    data = render_pairs(rows, cfg, template, tokenizer, spec)
    return data, audit_pairs(spec, data, len(rows), cfg.data.cutoff_len, cfg.preference.max_prompt_len)


def prepare_pairs(cfg: Config, tokenizer) -> PreparedPairs:
    """Train and held-out pairs (``data.validation_path``, else ``data.val_size`` of the rows) with their audits."""
    d, template = cfg.data, load_template(cfg.data.template)
    main, audit = _source(d.path, d.split, cfg, template, tokenizer)
    by_row = {p.row: p for p in main.pairs}
    if d.validation_path:
        val, val_audit = _source(d.validation_path, "validation", cfg, template, tokenizer)
        train, validation, audits = main.pairs, val.pairs, (audit, val_audit)
    else:
        train_rows, val_rows = split_indices(audit.rows, d.val_size, d.seed)
        train = [by_row[r] for r in train_rows if r in by_row]
        validation, audits = [by_row[r] for r in val_rows if r in by_row], (audit,)
    if d.max_rows is not None:
        train = train[: d.max_rows]
    return PreparedPairs(train, validation, audits, template, main.chat_template)


def train_preference(
    cfg: Config, output_dir: Path, model_path: str, tokenizer, resume: str | None, force: bool = False
) -> Path:
    """The run; the data and its audit come before the model loads, as for SFT, and so do the resume checks."""
    from kotune.evaluation.run_report import write_run_report
    from kotune.training.recipe import absolute_if_local, ready_folder, save_final

    data = prepare_pairs(cfg, tokenizer)
    for report in data.audits:
        for line in summary_lines(report):
            output.info(line)
    message = fatal_error(data.audits)
    if message is not None or not data.train:
        raise DataError(message or "no training pairs left; run `kotune data audit` on the config")
    unit = "responses" if isinstance(data.train[0], UnpairedResponse) else "pairs"
    output.info(f"kotune: data (preference): {len(data.train)} train {unit}, {len(data.validation)} held out")
    if data.chat_template is not None:
        tokenizer.chat_template = data.chat_template  # saved with the adapter, so inference renders the same
    fp = fingerprint.compute(cfg, tokenizer, data.template, pair_examples(data.train), pair_examples(data.validation))
    folder = find_resume(output_dir, resume, log=output.info)
    if folder is not None:
        fingerprint.check_resume(folder, fp, force)
        if already_finished(folder, output_dir, pair_steps(cfg, len(data.train)), log=output.info):
            return output_dir
    check_target_modules(cfg, model_path)
    trained = load_for_training(cfg, model_path)
    model = trained.peft
    if cfg.model.adapter:
        load_start_adapter(model, cfg.model.adapter)
        output.info(f"kotune: started from the adapter in {cfg.model.adapter}; it is the reference too")
    saved = replace(
        cfg,
        data=replace(
            cfg.data,
            format="preference",
            path=absolute_if_local(cfg.data.path),
            validation_path=absolute_if_local(cfg.data.validation_path),
        ),
    )
    if dist.is_main():
        inside(output_dir, CONFIG).write_text(redact(saved.to_yaml()), encoding="utf-8")
    start = StartWeights(model) if cfg.model.adapter else None  # the reference is the start, not the base
    fit = PreferenceFit(
        cfg, model, tokenizer.pad_token_id, data.train, data.validation, output_dir, start, fp, trained.fast
    )
    ready_folder(fit, folder)  # after StartWeights: a resumed run's reference is still its starting adapter
    with StopOnSignal() as stop:
        state = fit.run(stop)
    if fit.rank != 0:
        return output_dir
    save_final(fit, data.template, tokenizer, output_dir)
    audit = [line.removeprefix("kotune: ") for r in data.audits for line in summary_lines(r)]
    write_summary(
        output_dir,
        state,
        {
            "objective": cfg.train.objective,
            "train_pairs": len(data.train),
            "validation_pairs": len(data.validation),
            "audit": audit,
        },
    )
    output.info(f"kotune: adapter written to {output_dir}")
    output.info(f"kotune: run report written to {write_run_report(output_dir)}")
    return output_dir
