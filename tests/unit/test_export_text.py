"""Export's text checks, offline: the tokenizer shapes the GGUF writer accepts, and prompt text made literal for
Ollama's Go templates (rendered here by a model of text/template's lexer for the two actions kotune writes)."""

from __future__ import annotations

import json

import pytest

from kotune.export.gguf_tokenizer import ExportError, check_byte_level
from kotune.export.ollama import go_prompt

VOCAB = {"a": 0, "Ġ": 1, "Ġa": 2}
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
SEQUENCE_517 = {  # transformers 5.17's converted SmolLM2 decoder
    "type": "Sequence",
    "decoders": [
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        BYTE_LEVEL,
    ],
}


def tokenizer_json(decoder: dict, vocab: dict = VOCAB, model: str = "BPE") -> dict:
    return {"model": {"type": model, "vocab": vocab, "byte_fallback": True}, "decoder": decoder}


@pytest.mark.parametrize("decoder", [BYTE_LEVEL, SEQUENCE_517], ids=["transformers-5.24", "transformers-5.17"])
def test_both_conversions_of_smollm2_are_byte_level(decoder):
    check_byte_level(tokenizer_json(decoder))


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (tokenizer_json(SEQUENCE_517, {**VOCAB, "<0x41>": 3}), "ByteFallback"),  # a byte token it would decode
        (tokenizer_json(SEQUENCE_517, {**VOCAB, "▁a": 3}), "Replace"),  # a ▁ it would turn into a space
        (tokenizer_json({"type": "Metaspace", "replacement": "▁"}), "Metaspace decoder"),
        (tokenizer_json({"type": "Sequence", "decoders": [{"type": "Strip"}, BYTE_LEVEL]}), "Strip"),
        (tokenizer_json(BYTE_LEVEL, model="WordPiece"), "WordPiece"),
    ],
)
def test_a_decoder_step_that_changes_tokens_is_refused_and_named(data, named):
    with pytest.raises(ExportError, match=named):
        check_byte_level(data)


def render_go(template: str, content: str) -> str:
    """``template`` rendered as Go's text/template does, for text and the actions ``{{ "string" }}`` and
    ``{{ .Content }}``; any other action (a ``{`` of the text read as one) fails the test."""
    out, i = [], 0
    while (start := template.find("{{", i)) != -1:
        out.append(template[i:start])
        action = template[start + 2 :].lstrip(" ")
        if action.startswith('"'):
            value, end = json.JSONDecoder().raw_decode(action)
            out.append(value)
            rest = action[end:]
        else:
            assert action.startswith(".Content"), f"an action Go would not parse: {{{{{action[:20]}"
            out.append(content)
            rest = action[len(".Content") :]
        rest = rest.lstrip(" ")
        assert rest.startswith("}}"), f"an unclosed action: {template[start : start + 30]!r}"
        i = len(template) - len(rest) + 2
    return "".join(out) + template[i:]


@pytest.mark.parametrize(
    "prompt",
    [
        "###지시사항:{instruction}\n###답변:",
        "a {{ brace: {instruction} }}",  # Python format syntax: {{ is a literal {
        "{{{instruction}}}",  # the message between braces: a lone { meets the action after it
        "x {{{{ literal }}}} {instruction}{{",  # {{ in the text itself, and a { closing the prompt
        "}} {{ }}{{{{",
    ],
)
def test_ollama_renders_a_prompt_with_braces_literally(prompt):
    """Whatever braces a prompt holds, the Go template prints the prompt kotune trained with."""
    assert render_go(go_prompt(prompt), "MSG {{ .Content }}") == prompt.format(instruction="MSG {{ .Content }}")
