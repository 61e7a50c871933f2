"""Conversation rows rendered with a chat template into segments whose trained parts are exactly assistant turns.

Rows are read into the message shape templates take (``kotune.data.chat_rows``: tools, tool calls, tool results,
reasoning). The chat template renders the whole conversation once, with the row's ``tools``; each assistant turn
starts where the template's rendering of the turns before it (with the generation prompt) ends, and stops after
the first special token that follows its text: its end-of-turn token (``<|eot_id|>``, ``<|im_end|>``, EOS).
Within a turn, ``kotune.data.turn_parts`` locates the reasoning, content and tool calls the template rendered, so
each is a segment of its own kind and the options (``data.last_turn_only``, ``data.mask_history_reasoning``,
``data.drop_empty_think``) choose which are trained. The mask follows from the template's own text, and the
tokenizer never has to be trusted with a length.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kotune.config import DataConfig
from kotune.data.chat_rows import read_conversation
from kotune.data.encoding import bos_id_to_add
from kotune.data.formats import Rendered, SkipRow
from kotune.data.read import DataError
from kotune.data.templates import TemplateError
from kotune.data.turn_parts import EMPTY_THINK, PROMPT, REASONING, TurnParts, locate_parts

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


def to_messages(row: dict[str, Any], fmt: str, where: str) -> list[dict[str, Any]]:
    """A row's turns as chat messages (``kotune.data.chat_rows.read_conversation``), without its tools."""
    return read_conversation(row, fmt, where).messages


class ChatRenderer:
    """Renders conversation rows with one chat template and tokenizer (built once, used for every row)."""

    def __init__(self, tokenizer, data_cfg: DataConfig):
        self.tokenizer = tokenizer
        self.template = resolve_chat_template(data_cfg.chat_template, tokenizer)
        self.data_cfg = data_cfg
        self.bos_text = tokenizer.bos_token
        # encoding.py puts BOS in front itself when the tokenizer does; the template's own BOS text then goes
        self.drop_bos_text = bos_id_to_add(tokenizer) is not None
        self.end_of_turn = _special_token_pattern(tokenizer)
        self.added = _special_token_pattern(tokenizer, special_only=False)

    def apply(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, source: str, tools: list | None = None
    ) -> str:
        """The template's text of ``messages`` (and ``tools``); a template error is a DataError naming the row."""
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as exc:  # jinja2 errors and the template's own raise_exception(...)
            raise DataError(f"{source}: the chat template rejects this conversation: {exc}") from None

    def assistant_turns(
        self, messages: list[dict[str, Any]], source: str, tools: list | None = None
    ) -> tuple[str, list[tuple[int, TurnParts]]]:
        """The rendered conversation and, per assistant turn, where its generation prompt ends and its parts."""
        full = self.apply(messages, False, source, tools)
        indices = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        starts: list[int] = []
        for k in indices:
            prompt = self.apply(messages[:k], True, source, tools)
            if full.startswith(prompt) and (not starts or len(prompt) > starts[-1]):
                starts.append(len(prompt))
            else:  # the template renders earlier turns differently once later ones follow (Qwen3's reasoning)
                starts.append(self._turn_start(full, messages, k, prompt, starts[-1] if starts else 0, source, tools))
        turns: list[tuple[int, TurnParts]] = []
        for k, start, limit in zip(indices, starts, [*starts[1:], len(full)], strict=True):
            if turns and start < turns[-1][1].end:
                raise _not_turn_by_turn(source, k)
            parts = self.end_of_turn and locate_parts(full, start, limit, messages[k], self.end_of_turn, self.added)
            if not parts:
                raise TemplateError(
                    f"{source}: the chat template closes assistant turn {k} with no special token, so the model "
                    "would never learn to stop; use a template that ends assistant turns with an end-of-turn "
                    "token or EOS (data.chat_template=plain does)"
                )
            turns.append((start, parts))
        return full, turns

    def _turn_start(
        self, full: str, messages: list[dict[str, Any]], k: int, prompt: str, after: int, source: str, tools
    ) -> int:
        """Where assistant turn ``k`` starts in ``full`` when the rendering of the turns before it is not a prefix
        of ``full``: just after the first generation prompt past ``after`` (the turn before's start) that follows
        the text of every turn between them."""
        without = self.apply(messages[:k], False, source, tools)
        if not prompt.startswith(without) or prompt == without:
            raise _not_turn_by_turn(source, k)
        opener = prompt[len(without) :]
        between = [m["content"].strip() for m in messages[k - _since_assistant(messages, k) : k]]
        at = after
        for text in between:
            found = full.find(text, at) if text else at
            if found < 0:
                raise _not_turn_by_turn(source, k)
            at = found + len(text)
        found = full.find(opener, at)
        if found < 0:
            raise _not_turn_by_turn(source, k)
        return found + len(opener)

    def assistant_spans(
        self, messages: list[dict[str, Any]], source: str, tools: list | None = None
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the (start, end) character span of each assistant turn in it."""
        full, turns = self.assistant_turns(messages, source, tools)
        return full, [(start, parts.end) for start, parts in turns]

    def trains(self, kind: str, last_turn: bool) -> bool:
        """Whether text of ``kind`` in an assistant turn is trained under the data options."""
        cfg = self.data_cfg
        if cfg.train_on_all_turns:
            return True
        if cfg.last_turn_only and not last_turn:
            return False
        if kind == REASONING and cfg.mask_history_reasoning and not last_turn:
            return False
        return not (kind == EMPTY_THINK and cfg.drop_empty_think)

    def render(self, row: dict[str, Any], fmt: str, where: str) -> Rendered:
        """Segments of one row: text before / between assistant turns (untrained) and the turns' parts."""
        conversation = read_conversation(row, fmt, where)
        messages = conversation.messages
        if not any(m["role"] == "assistant" for m in messages):
            raise SkipRow("no assistant turn")
        if messages[0]["role"] == "assistant":
            raise SkipRow("starts with an assistant turn")
        full, turns = self.assistant_turns(messages, conversation.source, conversation.tools)
        pieces: list[tuple[str, bool, str]] = []
        at = 0
        for n, (start, parts) in enumerate(turns):
            pieces.append((full[at:start], self.data_cfg.train_on_all_turns, PROMPT))
            last = n == len(turns) - 1
            pieces += [(full[a:b], self.trains(kind, last), kind) for kind, a, b in parts.parts]
            at = parts.end
        # What follows the last assistant turn (a generation prompt, an unanswered turn) teaches nothing: dropped.
        first, trained, kind = pieces[0]
        if self.bos_text and first.startswith(self.bos_text):  # BOS is context, never a label
            bos = [] if self.drop_bos_text else [(self.bos_text, False, PROMPT)]
            pieces[:1] = [*bos, (first[len(self.bos_text) :], trained, kind)]
        pieces = [p for p in pieces if p[0]]
        key = "messages" if fmt == "messages" else "conversations"
        indices = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        notes = tuple(
            f"{key}[{k}]: {d}" for k, (_, parts) in zip(indices, turns, strict=True) for d in parts.differences
        )
        return Rendered(
            row["_row"], [(t, trained) for t, trained, _ in pieces], False, tuple(k for *_, k in pieces), notes
        )


def _since_assistant(messages: list[dict[str, Any]], k: int) -> int:
    """How many turns right before turn ``k`` are not the assistant's."""
    n = 0
    while n < k and messages[k - 1 - n]["role"] != "assistant":
        n += 1
    return n


def _not_turn_by_turn(source: str, turn: int) -> TemplateError:
    return TemplateError(
        f"{source}: the chat template renders the turns before turn {turn} differently once the "
        "conversation goes on, so that assistant turn cannot be located exactly; use "
        "data.chat_template=plain or a template that renders turn by turn"
    )


def _special_token_pattern(tokenizer, special_only: bool = True) -> re.Pattern | None:
    """A regex matching any special token's text except BOS, longest first (``special_only=False``: any added
    token's, such as Qwen3's ``<tool_call>``)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    texts = {t.content for t in added if t.special or not special_only}
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


def token_kinds(rendered: Rendered, tokenizer) -> list[str]:
    """The kind of each token of a rendered conversation as encoding lays it out (BOS in front when the
    tokenizer adds one), for the preview's colours and the audit's shares."""
    from kotune.data.encoding import encode_segments

    kinds = [PROMPT] if bos_id_to_add(tokenizer) is not None else []
    for ids, kind in zip(encode_segments(tokenizer, [t for t, _ in rendered.segments]), rendered.kinds, strict=True):
        kinds += [kind] * len(ids)
    return kinds
