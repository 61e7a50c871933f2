"""Preference rows (a prompt, a chosen and a rejected response) to token ids, masked exactly by construction.

Three shapes of pairs are read, detected from the columns:
- ``prompt`` text + ``chosen`` / ``rejected`` text: the prompt is used as it is and EOS closes each response;
- ``prompt`` as a message list (or any row of a file with a ``system`` column; an empty system is no system turn)
  + ``chosen`` / ``rejected`` as text or as a one-message assistant list: rendered through the chat template, each
  response ending at its end-of-turn token;
- ``instruction`` (+ ``input``) + ``chosen`` / ``rejected``: the prompt comes from ``data.template``.

KTO also reads unpaired rows (TRL's unpaired preference format): ``prompt`` + ``completion`` + a ``label`` (true:
a desirable response; ``LABELS`` lists the spellings read), the prompt and completion in either of the first two
shapes.

The prompt and each response are encoded separately and concatenated (as ``data.encoding`` does for SFT), so the
response's labels are exactly its own tokens. Truncation keeps the prompt's end (``preference.max_prompt_len``,
BOS stays in front) and then cuts each response at ``data.cutoff_len``; a response cut before its closing token
is counted (``eos_lost``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kotune.config import Config
from kotune.data.encoding import bos_id_to_add, encode_segments
from kotune.data.formats import SkipRow, _text, desirable
from kotune.data.read import DataError
from kotune.data.templates import Template

PREFERENCE_COLUMNS = ("chosen", "rejected")
"""Columns every preference row has, beside ``prompt`` or ``instruction``."""
UNPAIRED_COLUMNS = ("prompt", "completion", "label")
"""Columns of an unpaired preference row (KTO): one response and whether it is desirable."""


def is_preference(rows: list[dict[str, Any]]) -> bool:
    """Whether the first row has the preference columns (checked before the SFT formats: ``prompt`` is shared)."""
    columns = set(rows[0]) if rows else set()
    return set(PREFERENCE_COLUMNS) <= columns and bool({"prompt", "instruction"} & columns)


def is_unpaired(rows: list[dict[str, Any]]) -> bool:
    """Whether the first row is an unpaired preference row: prompt, completion and a true / false label."""
    return bool(rows) and set(UNPAIRED_COLUMNS) <= set(rows[0]) and desirable(rows[0]["label"]) is not None


def prompt_format(row: dict[str, Any]) -> str:
    """The SFT format whose prompts a preference row's prompt is built like (what chat / generate use)."""
    if "instruction" in row and "prompt" not in row:
        return "alpaca"
    return "prompt_completion" if isinstance(row.get("prompt"), str) and "system" not in row else "messages"


def chosen_as_sft(data, prompt_fmt: str):
    """A preference run's ``DataConfig`` read as SFT data on its chosen responses (what merge verifies on): the
    chosen column stands in for alpaca's ``output`` or for ``completion``; unpaired rows (which have a completion)
    are read as they are. None for conversational prompts."""
    from dataclasses import replace

    target = {"alpaca": "output", "prompt_completion": "completion"}.get(prompt_fmt)
    if target is None:
        return None
    from kotune.data.read import apply_columns, read_rows

    if is_unpaired(apply_columns(read_rows(data.path, data.split)[:1], data.columns, data.path)):
        return replace(data, format=prompt_fmt)
    columns = {k: v for k, v in data.columns.items() if k not in ("chosen", "rejected")}
    return replace(data, format=prompt_fmt, columns={**columns, target: data.columns.get("chosen", "chosen")})


@dataclass(frozen=True)
class PreferenceText:
    row: int
    prompt: str
    chosen: str
    rejected: str
    append_eos: bool
    """EOS closes each response (text prompts); chat-templated responses end at their end-of-turn token."""


@dataclass
class PreferencePair:
    row: int
    prompt: list[int]
    """BOS (when the tokenizer adds one) and the prompt's ids, after truncation: never trained."""
    chosen: list[int]
    """The chosen response's ids (with its closing token unless cut): all trained."""
    rejected: list[int]

    @property
    def longest(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))

    @property
    def input_tokens(self) -> int:
        """Tokens the model reads: the prompt twice, once before each response."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)

    @property
    def trained_tokens(self) -> int:
        return len(self.chosen) + len(self.rejected)


@dataclass(frozen=True)
class UnpairedText:
    row: int
    prompt: str
    completion: str
    append_eos: bool
    desirable: bool


@dataclass
class UnpairedResponse:
    """One response of unpaired (KTO) data: trained towards (desirable) or away from (undesirable)."""

    row: int
    prompt: list[int]
    completion: list[int]
    desirable: bool

    @property
    def longest(self) -> int:
        return len(self.prompt) + len(self.completion)

    @property
    def input_tokens(self) -> int:
        return len(self.prompt) + len(self.completion)

    @property
    def trained_tokens(self) -> int:
        return len(self.completion)


@dataclass
class PreferenceData:
    pairs: list[PreferencePair | UnpairedResponse] = field(default_factory=list)
    """What trains: pairs, or for unpaired rows one response each."""
    texts: list[PreferenceText | UnpairedText] = field(default_factory=list)
    """The rendered rows, kept for the audit (same order as the rows that rendered)."""
    skipped: dict[int, str] = field(default_factory=dict)
    """Rows left out, with the reason."""
    prompt_cut: list[int] = field(default_factory=list)
    """Rows whose prompt lost its start to ``preference.max_prompt_len``."""
    eos_lost: list[int] = field(default_factory=list)
    """Rows where the chosen or the rejected response lost its closing token to ``data.cutoff_len``."""
    blank_prompts: list[int] = field(default_factory=list)
    """Rows that train although their prompt (or instruction, or every user turn) is empty or blank."""
    chat_template: str | None = None
    """The chat template conversational rows were rendered with (None when none was)."""


def _response(value: Any, key: str, row: dict[str, Any], where: str) -> str:
    """A response as text: a string, or a list holding one assistant message."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise DataError(f"{where} (row {row['_row']}): '{key}' must be text or one assistant message")
        value = value[0].get("content")
    return _text({**row, key: value}, key, where)


class PreferenceRenderer:
    """Renders rows to ``PreferenceText`` with one template and, for conversations, one chat template."""

    def __init__(self, cfg: Config, template: Template, tokenizer, system_column: bool = False):
        self.cfg, self.template, self.tokenizer = cfg, template, tokenizer
        self.system_column = system_column
        """The file has a ``system`` column: every row is a conversation (an empty system is no system turn),
        so one file never trains in two formats."""
        self._chat = None

    def chat(self):
        if self._chat is None:
            from kotune.data.conversations import ChatRenderer

            self._chat = ChatRenderer(self.tokenizer, self.cfg.data)
        return self._chat

    def render(self, row: dict[str, Any], where: str) -> PreferenceText:
        chosen = _response(row.get("chosen"), "chosen", row, where)
        rejected = _response(row.get("rejected"), "rejected", row, where)
        if not chosen.strip() or not rejected.strip():
            raise SkipRow("empty response")
        prompt, (chosen, rejected), append_eos = self._prompt_and(row, [chosen, rejected], where)
        return PreferenceText(row["_row"], prompt, chosen, rejected, append_eos)

    def render_unpaired(self, row: dict[str, Any], where: str) -> UnpairedText:
        label = desirable(row.get("label"))
        if label is None:
            source = row.get("_source", where)
            raise DataError(
                f"{source} (row {row['_row']}): 'label' is {row.get('label')!r}; a KTO label is true or false "
                '(also "true" / "false" or 1 / 0): fix that row, or map another column with data.columns'
            )
        completion = _response(row.get("completion"), "completion", row, where)
        if not completion.strip():
            raise SkipRow("empty response")
        prompt, (completion,), append_eos = self._prompt_and(row, [completion], where)
        return UnpairedText(row["_row"], prompt, completion, append_eos, label)

    def _prompt_and(self, row: dict[str, Any], replies: list[str], where: str) -> tuple[str, list[str], bool]:
        """(prompt text, the replies' texts, whether EOS closes each reply) for the row's shape."""
        if "instruction" in row and "prompt" not in row:
            prompt = self.template.format(_text(row, "instruction", where), _text(row, "input", where, True))
            return prompt, replies, True
        prompt = row.get("prompt")
        if isinstance(prompt, str) and not self.system_column:
            return prompt, replies, True
        return self._conversation(row, prompt, replies, where)

    def _conversation(self, row: dict[str, Any], prompt: Any, replies: list[str], where: str):
        """Prompt = the chat template's text up to the assistant turn; each response = its turn up to the
        end-of-turn token (located as for SFT conversations, so the two agree on where a turn ends)."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if row.get("system"):
            messages = [{"role": "system", "content": str(row["system"])}, *messages]
        source = f"{row.get('_source', where)} (row {row['_row']})"
        chat, turns = self.chat(), []
        for reply in replies:
            full, spans = chat.assistant_spans([*messages, {"role": "assistant", "content": reply}], source)
            start, end = spans[-1]
            turns.append((full[:start], full[start:end]))
        if any(prompt != turns[0][0] for prompt, _ in turns):
            raise DataError(f"{source}: the chat template renders the prompt differently for chosen and rejected")
        prompt_text = turns[0][0]
        if chat.bos_text and chat.drop_bos_text and prompt_text.startswith(chat.bos_text):
            prompt_text = prompt_text[len(chat.bos_text) :]  # BOS is put in front as an id, like for SFT
        return prompt_text, [reply for _, reply in turns], False


def _segments(text: PreferenceText | UnpairedText) -> list[str]:
    """The texts encoded apart: the prompt, then each response."""
    if isinstance(text, UnpairedText):
        return [text.prompt, text.completion]
    return [text.prompt, text.chosen, text.rejected]


def encode_pairs(
    texts: list[PreferenceText | UnpairedText], tokenizer, cutoff_len: int, max_prompt_len: int
) -> PreferenceData:
    """Ids of every pair (or unpaired response): prompt and responses encoded separately (one batched call), then
    truncated."""
    bos, eos = bos_id_to_add(tokenizer), tokenizer.eos_token_id
    segments = [_segments(x) for x in texts]
    ids = iter(encode_segments(tokenizer, [t for row in segments for t in row]))
    data = PreferenceData(texts=texts)
    for text, row in zip(texts, segments, strict=True):
        prompt, *responses = (next(ids) for _ in row)
        head = [bos] if bos is not None else []
        if not head and prompt[:1] == [tokenizer.bos_token_id]:  # a chat template that writes BOS as text
            head, prompt = prompt[:1], prompt[1:]
        keep = max_prompt_len - len(head)
        if len(prompt) > keep:
            prompt = prompt[len(prompt) - keep :]  # the prompt's end is what the response answers; BOS stays
            data.prompt_cut.append(text.row)
        prompt = head + prompt
        closing = [eos] if text.append_eos else []
        room = cutoff_len - len(prompt)
        responses = [r + closing for r in responses]
        if any(len(r) > room for r in responses):
            data.eos_lost.append(text.row)
        cut = [r[:room] for r in responses]
        if isinstance(text, UnpairedText):
            data.pairs.append(UnpairedResponse(text.row, prompt, cut[0], text.desirable))
        else:
            data.pairs.append(PreferencePair(text.row, prompt, cut[0], cut[1]))
    return data


def render_pairs(rows: list[dict[str, Any]], cfg: Config, template: Template, tokenizer, where: str) -> PreferenceData:
    """Render and encode preference rows (pairs, or unpaired rows: ``is_unpaired``); rows that cannot train are
    counted in ``skipped`` with the reason."""
    renderer = PreferenceRenderer(cfg, template, tokenizer, any("system" in row for row in rows))
    render = renderer.render_unpaired if is_unpaired(rows) else renderer.render
    texts, skipped = [], {}
    for row in rows:
        try:
            texts.append(render(row, where))
        except SkipRow as reason:
            skipped[row["_row"]] = str(reason)
    data = encode_pairs(texts, tokenizer, cfg.data.cutoff_len, cfg.preference.max_prompt_len)
    data.skipped = skipped
    data.blank_prompts = [row["_row"] for row in rows if row["_row"] not in skipped and blank_prompt(row)]
    data.chat_template = renderer._chat.template if renderer._chat is not None else None
    return data


def blank_prompt(row: dict[str, Any]) -> bool:
    """Whether a row's prompt holds no text: its ``prompt`` or ``instruction``, or the content of every user turn
    of a message-list prompt, empty or blank."""
    prompt = row.get("prompt", row.get("instruction"))
    if isinstance(prompt, list):
        turns = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return not any(isinstance(t, str) and t.strip() for t in turns)
    return isinstance(prompt, str) and not prompt.strip() and not str(row.get("input") or "").strip()


def collate_pairs(
    pairs: list[PreferencePair | UnpairedResponse], pad_id: int, multiple: int = 8, packed: bool = False
) -> dict[str, Any]:
    """One batch of 2 x len(pairs) sequences: every chosen sequence, then every rejected one (one forward pass
    for both). Labels hold the response ids and -100 on the prompt and the padding. Unpaired responses: one
    sequence each, and ``desirable`` (bool, per sequence) in the batch. ``packed``: the sequences end to end in
    one row (``data.batching.collate_packed``: no padding; the fast path's form)."""
    import torch

    if pairs and isinstance(pairs[0], UnpairedResponse):
        sequences = [(p.prompt, p.completion) for p in pairs]
        extra = {"desirable": torch.tensor([p.desirable for p in pairs])}
    else:
        sequences = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        extra = {}
    if packed:
        from kotune.data.batching import collate_packed
        from kotune.data.examples import IGNORE, Example

        rows = [Example(i, a + b, [IGNORE] * len(a) + b) for i, (a, b) in enumerate(sequences)]
        return {**collate_packed(rows), **extra}
    return {**_padded(sequences, pad_id, multiple), **extra}


def _padded(sequences: list[tuple[list[int], list[int]]], pad_id: int, multiple: int) -> dict[str, Any]:
    """(prompt, response) id lists as padded ids, attention mask and labels (the response's ids only)."""
    import torch

    from kotune.data.examples import IGNORE

    width = max(len(a) + len(b) for a, b in sequences)
    width = -(-width // multiple) * multiple
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for i, (prompt, response) in enumerate(sequences):
        n = len(prompt) + len(response)
        ids[i, :n] = torch.tensor(prompt + response)
        labels[i, len(prompt) : n] = torch.tensor(response)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pair_examples(pairs: list[PreferencePair | UnpairedResponse]) -> list:
    """Each pair as two ``Example`` rows, prompt + chosen then prompt + rejected (an unpaired response as one),
    labelled on the response only: what ``kotune data preview`` shows of a preference run."""
    from kotune.data.examples import IGNORE, Example

    return [
        Example(p.row, p.prompt + response, [IGNORE] * len(p.prompt) + response)
        for p in pairs
        for response in ((p.completion,) if isinstance(p, UnpairedResponse) else (p.chosen, p.rejected))
    ]
