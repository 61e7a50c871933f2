"""Conversation rows rendered with a chat template into segments whose trained parts are exactly assistant turns.

Rows come as ``messages`` (``[{role, content}]``) or sharegpt ``conversations`` (``[{from, value}]``). The chat
template renders the whole conversation once; each assistant turn starts where the template's rendering of the
turns before it (with the generation prompt) ends, and stops after the first special token that follows its
content: its end-of-turn token (``<|eot_id|>``, ``<|im_end|>``, EOS). The text between is one trained segment,
so the mask follows from the template's own text and the tokenizer never has to be trusted with a length.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kotune.config import DataConfig
from kotune.data.encoding import bos_id_to_add
from kotune.data.formats import Rendered, SkipRow
from kotune.data.read import DataError
from kotune.data.templates import TemplateError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
"""sharegpt ``from`` values and the chat roles they stand for."""

ROLES = ("system", "user", "assistant")
"""Roles a ``messages`` turn may have."""

PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### 질문:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### 답변:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### 답변:\\n' }}{% endif %}"
)
"""Turn markers in plain text and assistant turns closed by EOS: every token it uses is one a base model has
seen in pretraining, so it needs no untrained special-token embeddings (the fix the audit offers for those)."""

BUILTIN_CHAT_TEMPLATES = {"plain": PLAIN_CHAT_TEMPLATE}


def resolve_chat_template(spec: str | None, tokenizer) -> str:
    """The Jinja text of ``data.chat_template``: unset is the tokenizer's own, else a built-in name or a file."""
    if spec is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates; the unnamed one is "default"
            own = own.get("default")
        if not own:
            raise TemplateError(
                "conversation data needs a chat template, and the tokenizer has none; set data.chat_template "
                f"to {' or '.join(BUILTIN_CHAT_TEMPLATES)} or to a Jinja file"
            )
        return own
    if spec in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        raise TemplateError(
            f"data.chat_template '{spec}' is neither a built-in ({', '.join(BUILTIN_CHAT_TEMPLATES)}) nor a file"
        )
    return path.read_text(encoding="utf-8")


def to_messages(row: dict[str, Any], fmt: str, where: str) -> list[dict[str, str]]:
    """A row's turns as ``[{role, content}]``; bad structure is a DataError naming the row and turn."""
    key = "messages" if fmt == "messages" else "conversations"
    role_key, text_key = ("role", "content") if fmt == "messages" else ("from", "value")
    roles = {role: role for role in ROLES} if fmt == "messages" else SHAREGPT_ROLES
    source = f"{row.get('_source', where)} (row {row['_row']})"
    turns = row.get(key)
    if turns is None:
        raise SkipRow(f"null {key}")
    if not isinstance(turns, list):
        raise DataError(f"{source}: column '{key}' holds {type(turns).__name__}, expected a list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{source}: {key}[{i}] is {type(turn).__name__}, expected {{{role_key}, {text_key}}}")
        role = turn.get(role_key)
        mapped = roles.get(role) if isinstance(role, str) else None
        if mapped is None:
            raise DataError(f"{source}: {key}[{i}].{role_key} is {role!r}; use one of {', '.join(roles)}")
        content = turn.get(text_key)
        if content is None:
            raise SkipRow(f"null {text_key} in a turn")
        if not isinstance(content, str):
            raise DataError(f"{source}: {key}[{i}].{text_key} holds {type(content).__name__}, expected text")
        messages.append({"role": mapped, "content": content})
    return messages


class ChatRenderer:
    """Renders conversation rows with one chat template and tokenizer (built once, used for every row)."""

    def __init__(self, tokenizer, data_cfg: DataConfig):
        self.tokenizer = tokenizer
        self.template = resolve_chat_template(data_cfg.chat_template, tokenizer)
        self.train_on_all_turns = data_cfg.train_on_all_turns
        self.bos_text = tokenizer.bos_token
        # encoding.py puts BOS in front itself when the tokenizer does; the template's own BOS text then goes
        self.drop_bos_text = bos_id_to_add(tokenizer) is not None
        self.end_of_turn = _special_token_pattern(tokenizer)

    def apply(self, messages: list[dict[str, str]], add_generation_prompt: bool, source: str) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja2 errors and the template's own raise_exception(...)
            raise DataError(f"{source}: the chat template rejects this conversation: {exc}") from None

    def assistant_spans(self, messages: list[dict[str, str]], source: str) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the (start, end) character span of each assistant turn in it."""
        full = self.apply(messages, False, source)
        spans: list[tuple[int, int]] = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.apply(messages[:k], True, source)
            if not full.startswith(prompt) or (spans and len(prompt) < spans[-1][1]):
                raise TemplateError(
                    f"{source}: the chat template renders the turns before turn {k} differently once the "
                    "conversation goes on, so that assistant turn cannot be located exactly; use "
                    "data.chat_template=plain or a template that renders turn by turn"
                )
            start = len(prompt)
            spans.append((start, self._turn_end(full, start, message["content"], k, source)))
        return full, spans

    def _turn_end(self, full: str, start: int, content: str, turn: int, source: str) -> int:
        """Just after the first special token behind the turn's content: its end-of-turn token."""
        text = content.strip()
        found = full.find(text, start) if text else -1
        after = found + len(text) if found >= 0 else start
        match = self.end_of_turn.search(full, after) if self.end_of_turn else None
        if match is None:
            raise TemplateError(
                f"{source}: the chat template closes assistant turn {turn} with no special token, so the model "
                "would never learn to stop; use a template that ends assistant turns with an end-of-turn "
                "token or EOS (data.chat_template=plain does)"
            )
        return match.end()

    def render(self, row: dict[str, Any], fmt: str, where: str) -> Rendered:
        """Segments of one row: text before / between assistant turns (untrained) and the turns (trained)."""
        messages = to_messages(row, fmt, where)
        if not any(m["role"] == "assistant" for m in messages):
            raise SkipRow("no assistant turn")
        if messages[0]["role"] == "assistant":
            raise SkipRow("starts with an assistant turn")
        source = f"{row.get('_source', where)} (row {row['_row']})"
        full, spans = self.assistant_spans(messages, source)
        segments: list[tuple[str, bool]] = []
        at = 0
        for start, end in spans:
            segments += [(full[at:start], self.train_on_all_turns), (full[start:end], True)]
            at = end
        # What follows the last assistant turn (a generation prompt, an unanswered turn) teaches nothing: dropped.
        first, trained = segments[0]
        if self.bos_text and first.startswith(self.bos_text):  # BOS is context, never a label
            bos = [] if self.drop_bos_text else [(self.bos_text, False)]
            segments[:1] = [*bos, (first[len(self.bos_text) :], trained)]
        return Rendered(row["_row"], [s for s in segments if s[0]], append_eos=False)


def _special_token_pattern(tokenizer) -> re.Pattern | None:
    """A regex matching any special token's text except BOS, longest first."""
    texts = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    texts.update(tokenizer.all_special_tokens)
    texts.discard(tokenizer.bos_token)
    texts.discard(None)
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


# -- where a reply ends ---------------------------------------------------------------------------
def end_of_turn_id(tokenizer, chat_template: str | None = None) -> int | None:
    """The special token a chat template (default: the tokenizer's) closes an assistant turn with."""
    chat_template = chat_template or tokenizer.chat_template
    if not chat_template:
        return None
    probe = "kotune-probe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
            chat_template=chat_template,
            tokenize=False,
        )
    except Exception:  # a template may reject this conversation (jinja raises its own types)
        return None
    after = text[text.rindex(probe) + len(probe) :] if probe in text else ""
    specials = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for token, token_id in specials.items():
        if after.startswith(token):
            return token_id
    return None


def stop_ids(tokenizer, generation_config=None, chat_template: str | None = None) -> list[int]:
    """Ids that end a reply: the tokenizer's EOS (what training appended), the chat template's end-of-turn
    token, and the model's own EOS ids from its generation config."""
    found: list[int] = []
    if tokenizer.eos_token_id is not None:
        found.append(tokenizer.eos_token_id)
    eot = end_of_turn_id(tokenizer, chat_template)
    if eot is not None:
        found.append(eot)
    configured = getattr(generation_config, "eos_token_id", None)
    found.extend([configured] if isinstance(configured, int) else configured or [])
    return list(dict.fromkeys(found))
