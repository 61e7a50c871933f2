"""Prompt templates: the walkthrough's Korean alpaca template, English alpaca, and user templates from YAML.

The template a run used is saved next to its adapter, so inference formats prompts exactly as training did.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from kotune.errors import KotuneError


class TemplateError(KotuneError, ValueError):
    """A template that cannot format rows; the message names the template and the placeholder."""

    refusal = True


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

RAW_PROMPT = Template(name="prompt", prompt_input="{instruction}", prompt_no_input="{instruction}")
"""What ``prompt_completion`` runs train on, the prompt as it is, as a template: the chat template of such a run
renders the user message unchanged (no input field, no generation prompt)."""


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


# -- the template as a chat template, for tools that prompt through apply_chat_template -------------------
def chat_template(template: Template, bos_token: str | None) -> str:
    """A Jinja chat template that renders exactly the prompt training used.

    A user message's ``content`` is the instruction; its optional ``input`` key is the input (blank or missing:
    the no-input prompt). The prompt's text after its last placeholder (``###답변:``) is the generation prompt:
    rendered after a user message that an assistant message follows, or with ``add_generation_prompt``. An
    assistant message renders as its content and EOS, as training appended it. ``bos_token``: put in front when
    the tokenizer starts its encodings with it (kotune does then too); None: nothing in front.
    """
    with_input_head, with_input_cue = jinja_parts(template.prompt_input, template.name)
    no_input_head, no_input_cue = jinja_parts(template.prompt_no_input, template.name)
    return "".join(
        [
            "{{- bos_token }}" if bos_token is not None else "",
            "{%- for message in messages %}",
            "{%- if message['role'] == 'user' %}",
            "{%- set input = message['input'] if message['input'] is string else '' %}",
            "{%- set instruction = message['content'] %}",
            f"{{%- if input | trim %}}{with_input_head}{{%- set cue = {with_input_cue} %}}",
            f"{{%- else %}}{no_input_head}{{%- set cue = {no_input_cue} %}}{{%- endif %}}",
            "{%- if not loop.last or add_generation_prompt %}{{- cue }}{%- endif %}",
            "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}",
            "{%- else %}{{- raise_exception('this model was trained on user and assistant turns only, not ' ",
            "+ message['role']) }}{%- endif %}",
            "{%- endfor %}",
        ]
    )


def jinja_parts(prompt: str, name: str) -> tuple[str, str]:
    """(Jinja for the prompt up to and including its last placeholder, the rest as a Jinja string literal)."""
    head, literal = [], ""
    for text, field, spec, conversion in string.Formatter().parse(prompt):
        literal += text  # an escaped brace ends a piece without a field
        if field is None:
            continue
        if spec or conversion:
            raise TemplateError(f"template {name}: {{{field}}} with a format spec cannot become a chat template")
        head.append(f"{{{{- {jinja_string(literal)} + {field} }}}}")
        literal = ""
    return "".join(head), jinja_string(literal)


def jinja_string(text: str) -> str:
    """``text`` as a Jinja string literal (JSON's escapes are the ones Jinja reads)."""
    return json.dumps(text, ensure_ascii=False)
