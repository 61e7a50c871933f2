"""``kotune merge``: fold a run's LoRA adapter into full weights, check the result, save a plain model folder.

Two merge targets:

* ``dequantized`` (default): the NF4 weights the adapter was trained against, dequantized
  (``bitsandbytes.functional.dequantize_4bit``), plus the LoRA update. This is the model the run evaluated.
* ``original``: the base's full-precision weights plus the LoRA update. The adapter never saw these weights,
  so the merged model drifts from what was trained by the quantization error.

Verification is always on: the merged model (in the saved dtype) and the adapter on the 4-bit base run over the
run's validation rows; ``merge_report.json`` gets mean and max |Δ logit|, top-1 agreement and the perplexity of
both, for both targets (``export.drift``). The chosen target must stay within ``drift``'s thresholds, else the merge
fails unless ``allow_drift``.

The output is built in a new hidden folder beside ``out`` and swapped in once accepted. Every merge output carries
``run_folder.MERGE_MARKER``, the list of files kotune wrote; ``force`` replaces only such a folder holding
nothing else, never the run or a folder holding it (``check_output``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from kotune import output
from kotune.errors import KotuneError
from kotune.export.drift import MAX_PERPLEXITY_CHANGE, MIN_TOP1_AGREEMENT, Drift, drift_message, measure_drift
from kotune.hashing import file_sha256
from kotune.run_folder import (
    ADAPTER,
    ADAPTER_CONFIG,
    CONFIG,
    MERGE_MARKER,
    MERGE_REPORT,
    RECORDS,
    SUMMARY,
    ModelFolder,
    folder_stop_ids,
    generation_eos,
    open_folder,
    save_config_copy,
    trained_chat_template,
)
from kotune.security import portable, redact

if TYPE_CHECKING:
    from kotune.data.examples import Example

# torch is imported inside the functions that use it, so `kotune merge --help` stays fast.

TARGETS = ("dequantized", "original")
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""``--dtype`` names and the ``model.compute_dtype`` names (torch's) they stand for."""

VERIFY_ROWS = 64
"""Validation rows the check runs over (the first ones; training rows when the run had no validation)."""
SHARD_SIZE = "2GB"
"""Largest safetensors shard written."""


class MergeError(KotuneError, ValueError):
    """A merge that cannot run or whose result drifts too far; the message says what to do."""


# -- building the merged weights --------------------------------------------------------------------
def copy_dequantized(quantized, full) -> int:
    """Overwrite ``full``'s weights with the quantized model's, 4-bit ones dequantized; returns how many were 4-bit."""
    import bitsandbytes as bnb

    params = dict(full.named_parameters(remove_duplicate=False))  # tied lm_head / embeddings under both names
    dequantized = 0
    for module_name, module in quantized.named_modules():
        for name, param in module.named_parameters(recurse=False):
            key = f"{module_name}.{name}" if module_name else name
            if key not in params:
                raise MergeError(f"parameter {key} of the quantized base has no match in the full-precision base")
            if isinstance(module, bnb.nn.Linear4bit) and name == "weight":
                value = bnb.functional.dequantize_4bit(param.data, param.quant_state)
                dequantized += 1
            else:
                value = param.data
            params[key].data.copy_(value.to(params[key].device, params[key].dtype))
    return dequantized


def merged_model(folder: ModelFolder, target: str, dtype: str):
    """Base weights of ``target`` plus the LoRA update (peft's merge, in float32), cast to ``dtype`` (``fp32``...)."""
    import torch
    from peft import PeftModel

    from kotune.model.load import load_base, peft_quietly

    full = load_base(replace(folder.config.model, compute_dtype="float32"), "none")
    if target == "dequantized" and folder.config.model.quantization != "none":
        quantized = load_base(folder.config.model, folder.config.model.quantization)
        if copy_dequantized(quantized, full) == 0:
            raise MergeError(f"{folder.path}: the base loaded in 4-bit has no 4-bit layers to dequantize")
        del quantized
    with peft_quietly():
        merged = PeftModel.from_pretrained(full, folder.path).merge_and_unload()
    return merged.to(getattr(torch, DTYPE_NAMES[dtype])).eval()


def verification_rows(folder: ModelFolder, tokenizer, limit: int) -> tuple[str, list[Example]]:
    """The run's validation rows (training rows if it had none), tokenized as training did."""
    from kotune.data.prepare import prepare
    from kotune.data.read import DataError

    data_cfg = folder.config.data
    if data_cfg.format == "preference":  # a preference run: verify on its chosen responses
        from kotune.data.preference import chosen_as_sft

        data_cfg = chosen_as_sft(data_cfg, folder.fmt)
        if data_cfg is None:
            raise MergeError(f"{folder.path}: merge cannot verify a preference run on conversational prompts yet")
    try:
        data = prepare(data_cfg, tokenizer)
    except DataError as exc:
        raise MergeError(
            f"merge verification needs the run's validation rows: {exc}. A relative data.path (saved by kotune "
            f"before it recorded absolute paths) is read from the working directory: make it absolute in "
            f"{folder.path / CONFIG}"
        ) from None
    split, rows = ("validation", data.validation) if data.validation else ("train", data.train)
    if not rows:
        raise MergeError(f"{folder.path}: no tokenized rows to verify the merge on")
    return split, rows[:limit]


# -- the job ----------------------------------------------------------------------------------------
def fingerprint(folder: ModelFolder, into: str, dtype: str) -> dict:
    """What a merge is made of; an existing output with the same fingerprint is already this merge."""

    return {
        ADAPTER: file_sha256(folder.path / ADAPTER),
        ADAPTER_CONFIG: file_sha256(folder.path / ADAPTER_CONFIG),
        "base_model": folder.config.model.path,
        "into": into,
        "dtype": dtype,
    }


def check_output(out: Path, run: Path, source: dict, force: bool) -> bool:
    """True when ``out`` already holds this exact merge; raises unless ``out`` is free or ``force`` may replace it.

    ``force`` only ever replaces a folder kotune marked as its own merge output and that holds nothing else:
    never the run, a folder holding the run, or anyone's other files.
    """
    where, source_run = out.resolve(), run.resolve()
    if where == source_run or where in source_run.parents:
        raise MergeError(f"--out {out} is the run being merged or a folder holding it; choose a new folder for --out")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    report = out / MERGE_REPORT
    if report.is_file() and json.loads(report.read_text(encoding="utf-8")).get("source") == portable(source):
        return True  # nothing will be written
    keep = "kotune will not replace it: choose a new folder for --out, or move it away yourself"
    written = merge_files(out)
    if written is None:
        raise MergeError(f"--out {out} is not a folder kotune merge wrote (it has no {MERGE_MARKER}); {keep}")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in written)
    if foreign:
        raise MergeError(f"--out {out} holds {foreign[0]}, which kotune merge did not write there; {keep}")
    if not force:
        raise MergeError(f"{out} holds a different kotune merge; pass --force to replace it, or choose --out")
    return False


def merge_files(out: Path) -> set[str] | None:
    """The files kotune merge wrote in ``out`` as its marker lists them (the marker too); None without a marker."""
    try:
        files = json.loads((out / MERGE_MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):  # a file, no marker, or not one kotune wrote
        return None
    return {*map(str, files), MERGE_MARKER}


def write_marker(out: Path) -> None:
    """Mark ``out`` as a kotune merge output, listing its files: the only folder ``--force`` may replace."""
    files = sorted(p.name for p in out.iterdir())
    marker = {"written_by": "kotune merge", "files": files}
    (out / MERGE_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


def swap_into(partial: Path, out: Path) -> None:
    """Put the finished ``partial`` at ``out``: an old merge there is renamed aside first, deleted only after."""
    if not out.exists():
        partial.rename(out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    out.rename(old / out.name)
    partial.rename(out)
    shutil.rmtree(old)


def merge_targets(folder: ModelFolder, into: str) -> tuple[tuple[str, ...], str]:
    """The targets to build and verify, and the one to save (a run trained unquantized has only ``original``)."""
    if folder.merged:
        raise MergeError(f"{folder.path} is already a merged model; give the training run's folder")
    quantization = folder.config.model.quantization
    if quantization == "none":
        if into == "dequantized":
            output.info("kotune: the run trained on unquantized weights: merging into them (dequantized = original)")
        return ("original",), "original"
    if quantization == "8bit" and into == "dequantized":
        raise MergeError(f"{folder.path}: merging into dequantized 8-bit weights is not supported; use --into original")
    return TARGETS, into


def base_config(folder: ModelFolder):
    """The transformers config of the base a run trained on (a GGUF base is converted, once, as training did)."""
    from transformers import AutoConfig

    from kotune.model.assets import resolve_model

    model = folder.config.model
    return AutoConfig.from_pretrained(resolve_model(model.path), trust_remote_code=model.trust_remote_code)


def check_base_layers(folder: ModelFolder) -> None:
    """Refuse a quantized run whose base keeps its projections in transformers' ``Conv1D`` (GPT-2 and kin).

    bitsandbytes holds those weights transposed, so the dequantized weights do not fit the full-precision model
    (a raw tensor-size error minutes in). The model is built on the meta device: no weight is read.
    """
    quantization = folder.config.model.quantization
    if quantization == "none":
        return
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = base_config(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=folder.config.model.trust_remote_code)
    conv = next((name for name, module in model.named_modules() if isinstance(module, Conv1D)), None)
    if conv is not None:
        raise MergeError(
            f"kotune merge cannot fold a {quantization}-trained adapter into model_type {config.model_type!r} "
            f"({', '.join(config.architectures or [])}): its projections ({conv}, ...) are transformers' Conv1D "
            "layers, which bitsandbytes stores transposed; merge supports bases built of nn.Linear projections "
            "(Llama, Mistral, Qwen2, Gemma, ...)"
        )


def build_and_verify(folder: ModelFolder, target: str, dtype: str, adapter, rows, save_to: Path | None) -> Drift:
    """Merge into ``target``, compare with the adapter, and save the merged model when ``save_to`` is given."""
    model = merged_model(folder, target, dtype)
    drift = measure_drift(model, adapter, rows)
    output.info(f"kotune: merge check, {target}{' (chosen)' if save_to else ''}: {drift.summary()}")
    if save_to is not None:
        from transformers import AutoTokenizer

        save_merged(model, AutoTokenizer.from_pretrained(folder.path), folder, save_to)
    return drift


def merge(
    run_dir: str | Path,
    out: str | Path | None = None,
    into: str = "dequantized",
    dtype: str | None = None,
    force: bool = False,
    allow_drift: bool = False,
    verify_rows: int = VERIFY_ROWS,
) -> Path:
    """Merge, verify both targets, save the chosen one to ``out`` (default ``RUN_DIR/merged``); returns ``out``."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from kotune.model.load import load_base, peft_quietly

    folder = open_folder(run_dir)
    targets, into = merge_targets(folder, into)
    check_base_layers(folder)
    dtype = dtype or {torch_name: name for name, torch_name in DTYPE_NAMES.items()}[folder.config.model.compute_dtype]
    out = Path(out) if out is not None else folder.path / "merged"
    source = fingerprint(folder, into, dtype)
    if check_output(out, folder.path, source, force):
        output.info(f"kotune: {out} already holds this merge (same adapter, target and dtype); nothing to do")
        return out
    split, rows = verification_rows(folder, AutoTokenizer.from_pretrained(folder.path), verify_rows)
    trained = load_base(folder.config.model, folder.config.model.quantization)
    with peft_quietly():
        adapter = PeftModel.from_pretrained(trained, folder.path).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))  # becomes ``out`` once accepted
    try:
        drifts = {t: build_and_verify(folder, t, dtype, adapter, rows, partial if t == into else None) for t in targets}
        if not drifts[into].within_threshold() and not allow_drift:
            raise MergeError(drift_message(into, drifts[into]))
        write_report(partial, report_of(source, into, dtype, allow_drift, split, rows, drifts))
        write_marker(partial)
        check_output(out, folder.path, source, force)  # the merge took minutes: look again before replacing
        swap_into(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    output.info(f"kotune: merged model written to {out}")
    return out


def report_of(source: dict, into: str, dtype: str, allow_drift: bool, split: str, rows, drifts: dict) -> dict:
    return {
        "source": source,
        "into": into,
        "dtype": dtype,
        "allow_drift": allow_drift,
        "verification": {"split": split, "rows": [e.row for e in rows]},
        "thresholds": {"min_top1_agreement": MIN_TOP1_AGREEMENT, "max_perplexity_change": MAX_PERPLEXITY_CHANGE},
        "targets": {t: d.to_dict() for t, d in drifts.items()},
    }


def save_merged(model, tokenizer, folder: ModelFolder, out: Path, shard_size: str = SHARD_SIZE) -> None:
    """Sharded safetensors, config, generation config that stops at EOS / end-of-turn, tokenizer (with a chat
    template rendering the trained prompt format), run files."""
    stops = folder_stop_ids(folder, tokenizer, model)
    tokenizer.chat_template = trained_chat_template(folder, tokenizer) or tokenizer.chat_template
    model.generation_config.eos_token_id = generation_eos(stops)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.config.use_cache = True
    model.save_pretrained(out, max_shard_size=shard_size)
    tokenizer.save_pretrained(out)
    for name in RECORDS:  # so chat, generate and push read the merged folder like the run
        if name == SUMMARY and (folder.path / name).is_file():  # a record: its audit lines name the data files
            summary = portable(json.loads((folder.path / name).read_text(encoding="utf-8")))
            (out / name).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        elif name == CONFIG:  # eval and push read the run's data and base: their paths, relative to the folder
            save_config_copy(folder.config, out)  # (``out`` is built beside its final place: the same relative paths)
        elif (folder.path / name).is_file():
            shutil.copy2(folder.path / name, out / name)


def write_report(out: Path, report: dict) -> None:
    text = json.dumps(portable(report), indent=1, ensure_ascii=False) + "\n"
    (out / MERGE_REPORT).write_text(redact(text), encoding="utf-8")
