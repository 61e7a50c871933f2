"""The model card ``kotune push`` uploads as README.md: metadata the hub reads (base model, datasets, licence,
language, tags), how to use the model with its trained prompt, the data, hyperparameters, training and evaluation
results, and the merge check; every section from the folder's own records."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from kotune.data.formats import CHAT_FORMATS
from kotune.model.licence import REPO_ID, Licence, base_licence, hub_model_id
from kotune.run_folder import (
    CONFIG,
    MERGE_REPORT,
    ModelFolder,
    merge_targets_note,
    read_json,
    read_metrics,
    read_summary,
)


def source_name(spec: str) -> str:
    """How uploaded files name the base model or the data: a hub name or ``pypi:`` spec as configured, a local path
    by its last part (a cache or temporary folder means nothing elsewhere)."""
    return spec if spec.startswith("pypi:") or hub_model_id(spec) else Path(spec).name


def last_train_loss(folder: Path) -> float | None:
    """The last logged training loss in the folder's metrics.jsonl."""
    losses = [r["loss"] for r in read_metrics(folder) if "loss" in r]
    return losses[-1] if losses else None


def model_card(folder: ModelFolder, repo: str) -> str:
    """README.md: front matter, how to use it, template, data, hyperparameters, metrics, merge report."""
    from kotune.security import redact

    cfg = folder.config
    base = hub_model_id(cfg.model.path)
    kind = "merged into the base weights" if folder.merged else "a LoRA adapter"
    parts = [
        "---\n" + yaml.safe_dump(card_metadata(folder), sort_keys=False, allow_unicode=True) + "---\n",
        f"# {repo.split('/')[-1]}\n\n`{source_name(cfg.model.path)}` fine-tuned with kotune ({kind}; base loaded "
        f"in {cfg.model.quantization}, compute dtype {cfg.model.compute_dtype}).\n",
        usage_section(folder, repo, base),
        template_section(folder),
        data_section(folder),
        hyperparameter_section(folder),
        metrics_section(folder),
    ]
    report = read_json(folder.path / MERGE_REPORT)
    if report:
        parts.append(merge_section(report))
    parts += [eval_section(folder.path), license_section(folder)]
    return redact("\n".join(p for p in parts if p))


def eval_section(path: Path) -> str:
    """``kotune eval``'s table when its report is in the folder (``eval/``), so the card shows what was measured."""
    from kotune.evaluation.tables import REPORT_FILE, markdown

    report = read_json(path / "eval" / REPORT_FILE)
    if report is None:
        return ""
    return f"## Evaluation\n\n`kotune eval` on this model (`eval/{REPORT_FILE}`):\n\n{markdown(report)}"


def license_section(folder: ModelFolder) -> str:
    """What the front matter cannot say: a licence not known here (and where to check it), one that forbids
    commercial use, or one whose commercial terms kotune has not established."""
    spec = folder.config.model.path
    lic = base_licence(spec)
    base = hub_model_id(spec)
    where = f"its model card, https://huggingface.co/{base}" if base else f"where `{source_name(spec)}` came from"
    if lic is None:
        return (
            "## License\n\nThe base model's licence was not found on this machine when this card was written, so "
            f"it is given as unknown. This model is bound by the base's licence: check {where}.\n"
        )
    if lic.commercial_use is False:
        return (
            f"## License\n\n**Non-commercial.** The base model `{source_name(spec)}` is under the {lic.name} "
            f"({lic.source}), which does not allow commercial use; this model, trained from it, is bound by the same "
            f"terms. Read them at {where}.\n"
        )
    if lic.commercial_use is None and lic.id == "other":
        return (
            f"## License\n\nThe base model `{source_name(spec)}` is under the {lic.name} ({lic.source}); this model "
            f"is bound by its terms, including whatever they say of commercial use. Read them at {where}.\n"
        )
    return ""


def card_metadata(folder: ModelFolder) -> dict:
    """The front matter the hub reads: library, base model, language, license, datasets, tags."""
    cfg = folder.config
    meta: dict = {"library_name": "transformers" if folder.merged else "peft"}
    base = hub_model_id(cfg.model.path)
    if base:
        meta["base_model"] = base
    if is_korean(folder):
        meta["language"] = ["ko"]
    meta.update(license_metadata(base_licence(cfg.model.path), base))
    datasets = [d for d in (cfg.data.path, cfg.data.validation_path) if d and hub_dataset_id(d)]
    if datasets:
        meta["datasets"] = datasets
    meta["tags"] = ["kotune", "lora", *(["qlora"] if cfg.model.quantization == "4bit" else [])]
    return meta


def license_metadata(lic: Licence | None, base: str | None) -> dict:
    """``license`` (and, for a licence the hub has no id for or one not known here, ``license_name`` and
    ``license_link``) for the front matter."""
    if lic is not None and lic.id != "other":
        return {"license": lic.id}
    name = re.sub(r"[^a-z0-9.]+", "-", lic.name.lower()).strip("-") if lic is not None else "unknown"
    link = {"license_link": f"https://huggingface.co/{base}"} if base else {}
    return {"license": "other", "license_name": name} | link


def hub_dataset_id(spec: str) -> bool:
    """Whether ``spec`` names a hub dataset, not a local file or folder."""
    return not Path(spec).exists() and REPO_ID.fullmatch(spec) is not None


HANGUL = re.compile("[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
KOREAN_SHARE = 0.3
"""Share of letters that are Hangul above which text counts as Korean (mixed Korean text has Latin in it)."""


def is_korean(folder: ModelFolder) -> bool:
    """Korean training data: told from its first rows when the data is a local file here, else from the template
    the prompts were made with (runs on instruction rows)."""
    from kotune.data.read import DataError, read_rows

    d = folder.config.data
    text = ""
    if Path(d.path).exists():
        try:
            rows = read_rows(d.path, d.split)[:100]
            text = " ".join(str(v) for row in rows for k, v in row.items() if not k.startswith("_"))
        except DataError:
            text = ""
    if not text and folder.fmt == "alpaca":
        text = folder.template.prompt_no_input
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(bool(HANGUL.match(c)) for c in letters) / len(letters) > KOREAN_SHARE


def usage_section(folder: ModelFolder, repo: str, base: str | None) -> str:
    if folder.merged:
        load = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")\n'
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")'
        )
    else:
        load = (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")\n'
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")'
            + ("" if base else f"  # base: {source_name(folder.config.model.path)}; pass your copy of it")
        )
    return (
        "## Use\n\n```python\n"
        + load
        + "\n```\n\n"
        + prompt_usage(folder)
        + (
            "Generation stops at the EOS / end-of-turn token. "
            "With kotune: `kotune chat` or `kotune generate` on a download of this repository.\n"
        )
    )


def prompt_usage(folder: ModelFolder) -> str:
    """How to prompt it: the chat template it was trained with, which for instruction rows renders the template."""
    if folder.fmt in CHAT_FORMATS:
        return "Format prompts with the tokenizer's chat template, the one it was trained with. "
    if folder.fmt != "alpaca":
        return "It was trained on raw prompts: the tokenizer's chat template renders the user message as it is. "
    return (
        "The tokenizer's chat template renders exactly the trained prompt (the template below): the user message is "
        "the instruction, its optional `input` key the input.\n\n```python\n"
        'messages = [{"role": "user", "content": "INSTRUCTION", "input": "INPUT (optional)"}]\n'
        'ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")\n'
        "```\n\n"
    )


def template_section(folder: ModelFolder) -> str:
    t = folder.template
    return (
        f"## Prompt template ({t.name})\n\nWithout input:\n\n```text\n{t.prompt_no_input}\n```\n\n"
        f"With input:\n\n```text\n{t.prompt_input}\n```\n"
    )


def data_section(folder: ModelFolder) -> str:
    d = folder.config.data
    summary = read_summary(folder.path) or {}
    rows = ", ".join(f"{k.replace('_', ' ')}: {summary[k]}" for k in ("train_rows", "validation_rows") if k in summary)
    rows = "; " + rows if rows else ""
    return f"## Data\n\n`{source_name(d.path)}` ({folder.fmt}; cutoff {d.cutoff_len} tokens){rows}.\n"


def hyperparameter_section(folder: ModelFolder) -> str:
    cfg = folder.config
    lora, t = cfg.lora, cfg.train
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    rows = {
        "LoRA r / alpha / dropout": f"{lora.r} / {lora.alpha} / {lora.dropout}",
        "LoRA target modules": targets,
        "learning rate, schedule, warm-up": f"{t.learning_rate}, {t.lr_scheduler}, {t.warmup_steps} steps",
        "effective batch (rows per step)": str(cfg.effective_batch_size()),
        "epochs / max steps": f"{t.num_epochs} / {t.max_steps}",
        "optimizer": t.optimizer,
        "seed": str(t.seed),
    }
    if t.objective != "sft":  # a preference or RL run: the objective and the settings it reads
        rows["objective"] = objective_settings(cfg)
    table = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    return f"## Hyperparameters\n\n| setting | value |\n|---|---|\n{table}\n\nFull config: `{CONFIG}`.\n"


def objective_settings(cfg) -> str:
    """``dpo (beta 0.1, loss sigmoid, label smoothing 0.0)``: the objective and the preference (or GRPO) settings
    it uses."""
    p, g = cfg.preference, cfg.grpo
    used = {
        "grpo": {
            "loss": g.loss_type,
            "generations": g.generations,
            "beta": g.beta,
            "rewards": ", ".join(f"{name} x{weight:g}" for name, weight in g.rewards.items()),
        },
        "dpo": {"beta": p.beta, "loss": p.loss_type, "label smoothing": p.label_smoothing},
        "simpo": {"beta": p.beta, "gamma": p.simpo_gamma},
        "orpo": {"lambda": p.orpo_lambda},
        "kto": {
            "beta": p.beta,
            "desirable weight": p.kto_desirable_weight,
            "undesirable weight": p.kto_undesirable_weight,
        },
    }[cfg.train.objective]
    start = f"; started from the adapter {cfg.model.adapter}" if cfg.model.adapter else ""
    return f"{cfg.train.objective} ({', '.join(f'{k} {v}' for k, v in used.items())}){start}"


def metrics_section(folder: ModelFolder) -> str:
    summary = read_summary(folder.path) or {}
    lines = []
    if "steps" in summary:
        lines.append(f"- optimizer steps: {summary['steps']}, supervised tokens: {summary.get('tokens')}")
    if summary.get("best_eval_loss") is not None:
        lines.append(f"- best validation loss: {summary['best_eval_loss']:.4f} (step {summary.get('best_step')})")
    loss = last_train_loss(folder.path)
    if loss is not None:
        lines.append(f"- last training loss: {loss:.4f}")
    return "## Metrics\n\n" + ("\n".join(lines) if lines else "No run summary in this folder.") + "\n"


def merge_section(report: dict) -> str:
    rows = "\n".join(
        f"| {name}{' (this model)' if name == report.get('into') else ''} | {d['mean_abs_logit_diff']:.3g} | "
        f"{100 * d['top1_agreement']:.2f}% | {d['perplexity_merged']:.4g} | {d['perplexity_adapter']:.4g} |"
        for name, d in report.get("targets", {}).items()
    )
    note = merge_targets_note(report)
    return (
        f"## Merge check\n\nMerged into {report.get('into')} weights, saved as {report.get('dtype')}, compared with "
        f"the adapter on the 4-bit base over {len(report.get('verification', {}).get('rows', []))} validation rows:\n\n"
        "| target | mean abs logit diff | top-1 agreement | perplexity merged | perplexity adapter |\n"
        f"|---|---|---|---|---|\n{rows}\n" + (f"\n{note}\n" if note else "")
    )
