"""Prompt templates: the walkthrough's Korean alpaca template, English alpaca, and user templates from YAML.

The template a run used is saved next to its adapter, so inference formats prompts exactly as training did.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

TEMPLATE_FILE = "kotune_template.yaml"


class TemplateError(ValueError):
    """A template that cannot format rows; the message names the template and the placeholder."""


@dataclass(frozen=True)
class Template:
    name: str
    prompt_input: str
    """Prompt for rows with a non-empty input: placeholders ``{instruction}`` and ``{input}``."""
    prompt_no_input: str
    """Prompt for rows without input: placeholder ``{instruction}``."""

    def format(self, instruction: str, input: str | None = None) -> str:
        """The prompt for one row; an empty, whitespace-only or missing input uses ``prompt_no_input``."""
        if input is not None and input.strip():
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TEMPLATE_FILE
        path.write_text(yaml.safe_dump(asdict(self), allow_unicode=True, sort_keys=False), encoding="utf-8")
        return path


# Byte for byte the two templates of the walkthrough ("답변에 띄어쓰기 X": no space after ###답변:).
KO_ALPACA = Template(
    name="ko-alpaca",
    prompt_input=(
        "아래는 문제를 설명하는 지시사항과, 구체적인 답변을 방식을 요구하는 입력이 함께 있는 문장입니다. "
        "이 요청에 대해 적절하게 답변해주세요.\n###입력:{input}\n###지시사항:{instruction}\n###답변:"
    ),
    prompt_no_input=(
        "아래는 문제를 설명하는 지시사항입니다. 이 요청에 대해 적절하게 답변해주세요."
        "\n###지시사항:{instruction}\n###답변:"
    ),
)

ALPACA = Template(
    name="alpaca",
    prompt_input=(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    prompt_no_input=(
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    ),
)

BUILTIN = {t.name: t for t in (KO_ALPACA, ALPACA)}


def placeholders(text: str) -> set[str]:
    """Field names a format string uses; malformed braces raise TemplateError."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as exc:
        raise TemplateError(f"malformed braces ({exc}); write a literal brace as '{{{{' or '}}}}'") from None


def validate(template: Template, where: str) -> Template:
    """Check that each prompt uses exactly the placeholders it needs."""
    need = {"prompt_input": {"instruction", "input"}, "prompt_no_input": {"instruction"}}
    for key, required in need.items():
        try:
            found = placeholders(getattr(template, key))
        except TemplateError as exc:
            raise TemplateError(f"{where}: '{key}': {exc}") from None
        if missing := required - found:
            raise TemplateError(f"{where}: '{key}' lacks placeholder {{{sorted(missing)[0]}}}")
        if extra := found - required:
            raise TemplateError(
                f"{where}: '{key}' uses unknown placeholder {{{sorted(extra)[0]}}}; "
                f"allowed: {', '.join('{' + r + '}' for r in sorted(required))}"
            )
    return template


def load_template(spec: str) -> Template:
    """A built-in template by name, or a YAML file with ``prompt_input`` and ``prompt_no_input``."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec)
    if not path.is_file():
        raise TemplateError(f"template '{spec}' is neither a built-in ({', '.join(BUILTIN)}) nor a file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TemplateError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise TemplateError(f"{path}: expected a mapping with prompt_input and prompt_no_input")
    unknown = set(raw) - {"name", "prompt_input", "prompt_no_input"}
    if unknown:
        raise TemplateError(f"{path}: unknown key '{sorted(unknown)[0]}'")
    for key in ("prompt_input", "prompt_no_input"):
        if not isinstance(raw.get(key), str):
            raise TemplateError(f"{path}: '{key}' is missing or not a string")
    template = Template(str(raw.get("name", path.stem)), raw["prompt_input"], raw["prompt_no_input"])
    return validate(template, str(path))


def load_saved_template(directory: str | Path) -> Template:
    """The template a run saved next to its adapter."""
    path = Path(directory) / TEMPLATE_FILE
    if not path.is_file():
        raise TemplateError(f"{directory}: no {TEMPLATE_FILE}; is this a kotune output folder?")
    return load_template(str(path))
