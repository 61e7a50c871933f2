"""An Ollama model: the GGUF file and a ``Modelfile`` whose ``TEMPLATE`` renders prompts as training did.

Ollama formats prompts with Go templates, not with the GGUF's Jinja chat template, so the trained prompt format is
written again in Go template syntax: each user message becomes the run's no-input prompt with the message as the
instruction (Ollama's messages have no separate input field) followed by the answer cue (``###답변:``); each
assistant message its text and EOS, as training appended it. BOS is not in the template: Ollama's tokenizer puts it
in front when the GGUF says so (``tokenizer.ggml.add_bos_token``), as kotune does. ``PARAMETER stop`` lists EOS and
the end-of-turn token, so replies end where the model was trained to end them; the sampling defaults are
``kotune chat``'s.

Runs trained on conversations prompt through the model's own Jinja chat template, which has no general
translation to Go; they are refused with what to do instead.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from kotune import output
from kotune.export.gguf import ExportError, Source, refuse_existing, source_of, write_gguf

MODELFILE = "Modelfile"
DEFAULT_PARAMETERS = {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "repeat_penalty": 1.0}
"""``kotune chat``'s sampling (top-k and the repetition penalty off, which Ollama turns on by default)."""
MAX_CONTEXT = 4096
"""``num_ctx``: the model's context length, at most this (more costs memory on every machine that runs it)."""


def go_literal(text: str) -> str:
    """``text`` as literal Go template text: every ``{`` printed by an action of its own.

    Only ``{{`` starts an action, but a lone ``{`` at the end of one piece meets the ``{{`` of the next (``###{``
    before ``{{ .Content }}``) or another lone ``{`` (two escaped braces of a kotune prompt), so none is left as
    text. ``}`` outside an action is plain text in Go templates.
    """
    return text.replace("{", '{{ "{" }}')


def go_prompt(prompt: str) -> str:
    """A kotune prompt format (``{instruction}`` placeholders) as Go template text over a message's content."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(prompt):
        parts.append(go_literal(literal))
        if field is not None:
            parts.append("{{ .Content }}")
    return "".join(parts)


def go_template(prompt_no_input: str, eos_token: str) -> str:
    """The whole conversation: user turns through the prompt format, assistant turns closed by EOS."""
    # No ``{{-`` trimming: it would eat whitespace the prompt ends with (alpaca's cue ends with a newline).
    return (
        '{{ range .Messages }}{{ if eq .Role "user" }}'
        + go_prompt(prompt_no_input)
        + '{{ else if eq .Role "assistant" }}{{ .Content }}'
        + go_literal(eos_token)
        + "{{ end }}{{ end }}"
    )


def modelfile(gguf_name: str, source: Source, prompt_no_input: str, context_length: int) -> str:
    """The Modelfile text for ``ollama create NAME -f Modelfile`` in the folder holding ``gguf_name``."""
    template = go_template(prompt_no_input, source.eos_token)
    if '"""' in template:
        raise ExportError('the prompt template holds """, which cannot stand in a Modelfile TEMPLATE')
    lines = [
        "# Written by kotune export. In this folder: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
        *(f"PARAMETER stop {json.dumps(token, ensure_ascii=False)}" for token in source.stop_tokens),
        *(f"PARAMETER {key} {value}" for key, value in DEFAULT_PARAMETERS.items()),
        f"PARAMETER num_ctx {min(context_length, MAX_CONTEXT)}",
    ]
    return "\n".join(lines) + "\n"


def trained_prompt(path: str | Path) -> str:
    """The run's prompt format for a message with no input; an error for runs trained on conversations."""
    from kotune.data.formats import CHAT_FORMATS
    from kotune.data.templates import RAW_PROMPT
    from kotune.run_folder import open_folder

    folder = open_folder(path)
    if folder.fmt in CHAT_FORMATS:
        raise ExportError(
            f"{folder.path} was trained on conversations ({folder.fmt}) through a Jinja chat template, which kotune "
            "cannot translate to Ollama's Go templates; export --format gguf and write the Modelfile TEMPLATE by hand"
        )
    return (folder.template if folder.fmt == "alpaca" else RAW_PROMPT).prompt_no_input


def export_ollama(path: str | Path, quant: str, out: str | Path | None = None) -> Path:
    """``kotune export PATH --format ollama``: a folder (default ``PATH/ollama``) with the GGUF and a Modelfile."""
    from transformers import AutoConfig

    prompt = trained_prompt(path)  # refuse before merging or writing anything
    out = Path(out) if out is not None else Path(path) / "ollama"
    gguf_name = f"{Path(path).resolve().name}-{quant}.gguf"
    refuse_existing(out / MODELFILE)
    refuse_existing(out / gguf_name)
    source = source_of(path)
    context = AutoConfig.from_pretrained(source.model_dir).max_position_embeddings
    text = modelfile(gguf_name, source, prompt, context)  # its refusals too come before ``out`` is made
    write_gguf(
        source.model_dir, out / gguf_name, quant, source.chat_template, source.stop_ids, Path(path).resolve().name
    )
    (out / MODELFILE).write_text(text, encoding="utf-8")
    output.info(f"kotune: wrote {out / MODELFILE}; create the model with: cd {out} && ollama create NAME -f Modelfile")
    return out
