"""A run or merged folder loaded for generation: the merged model, or the adapter on its base (``model.load``)."""

from __future__ import annotations

from kotune.hashing import file_sha256
from kotune.run_folder import ADAPTER_FILES, MERGE_REPORT, ModelFolder

# torch and transformers are imported inside the functions that use them, so that `kotune --help` stays fast.


def load_model(folder: ModelFolder, base: str | None = None):
    """(model, tokenizer) ready to generate: the merged model, or the adapter on its base.

    ``base`` picks the base's quantization for an adapter (``4bit``, ``8bit``, ``none``); unset: as trained.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kotune.model.load import device_map, load_base

    tokenizer = AutoTokenizer.from_pretrained(folder.path)
    if folder.merged:
        # kotune merge writes safetensors only; never fall back to pickle weights someone put there
        model = AutoModelForCausalLM.from_pretrained(
            folder.path, dtype="auto", device_map=device_map(), use_safetensors=True
        )
    else:
        from peft import PeftModel

        quantization = base or folder.config.model.quantization
        from kotune.model.load import peft_quietly

        with peft_quietly():
            model = PeftModel.from_pretrained(load_base(folder.config.model, quantization), folder.path)
    model.eval()
    return model, tokenizer


def model_fingerprint(folder: ModelFolder, base: str | None = None) -> str:
    """A short name for the weights a folder generates with: for a run, its adapter files, base model and the
    quantization the base is loaded in (``base``, else as trained); for a merge, what its report says it was made
    of (adapter, base, target, dtype), else its weight files."""
    import hashlib
    import json

    if folder.merged:
        report = folder.path / MERGE_REPORT
        if report.is_file():
            parts = [json.dumps(json.loads(report.read_text(encoding="utf-8"))["source"], sort_keys=True)]
        else:
            parts = [file_sha256(p) for p in sorted(folder.path.glob("model*.safetensors"))]
    else:
        adapter = [file_sha256(folder.path / n) for n in ADAPTER_FILES]
        parts = [*adapter, folder.config.model.path, base or folder.config.model.quantization]
    kind = "merged" if folder.merged else "adapter"
    return f"{kind}:{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}"
