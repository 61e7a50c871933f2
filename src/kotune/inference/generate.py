"""Inference as small functions: format → encode → prefill → decode step → sample → strip.

Prompts are built exactly as training built them: the template saved with the run (or the tokenizer's chat
template for runs trained on conversations), encoded without special tokens and with BOS put in front only
when the tokenizer itself does that (``kotune.data.encoding``). Generation stops at EOS or an end-of-turn token.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kotune.run_folder import ModelFolder

if TYPE_CHECKING:
    import torch

# torch and transformers are imported inside the functions that use them, so that `kotune --help` and
# argument parsing (which read Sampling's defaults) stay fast.


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    """Sampling temperature; 0 picks the most likely token (greedy, reproducible)."""
    top_p: float = 1.0
    """Sample only from the smallest set of tokens whose probabilities add up to this (1 = all)."""
    max_new_tokens: int = 256
    """Stop after this many new tokens when no EOS / end-of-turn token came."""
    repetition_penalty: float = 1.0
    """Divide the positive scores (multiply the negative ones) of tokens already in the prompt or reply by this
    before choosing, as transformers' ``repetition_penalty`` does (1 = off; small models loop less at 1.1-1.3)."""


@dataclass(frozen=True)
class Generation:
    ids: list[int]
    """Generated token ids, without the stop token."""
    stopped: bool
    """True when a stop token ended it; False when ``max_new_tokens`` ran out."""


def pad_id(tokenizer) -> int:
    """Padding for left-padded prompts: the tokenizer's pad token, else EOS (masked out either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# -- format -----------------------------------------------------------------------------------------
def prompt_messages(row: dict[str, Any], fmt: str, where: str) -> list[dict[str, str]]:
    """A conversation row's turns (``data.conversations``), cut before a final assistant turn: the reply to make."""
    from kotune.data.conversations import to_messages
    from kotune.data.formats import SkipRow
    from kotune.data.read import DataError

    try:
        messages = to_messages(row, fmt, where)
    except SkipRow as reason:
        raise DataError(f"{where}: row {row['_row']}: {reason}; no prompt can be made of it") from None
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise DataError(f"{where}: row {row['_row']}: no turn before the answer to prompt with")
    return messages


def chat_prompt(tokenizer, messages: list[dict[str, Any]], data_cfg, tools: list | None = None) -> str:
    """The conversation through the chat template training used (``data.chat_template``), up to the reply; a
    row's ``tools`` rendered as training rendered them."""
    from kotune.data.conversations import ChatRenderer

    return ChatRenderer(tokenizer, data_cfg).apply(messages, add_generation_prompt=True, source="prompt", tools=tools)


def row_prompt(row: dict[str, Any], fmt: str, folder: ModelFolder, tokenizer, where: str) -> str:
    """The prompt text for a data row of any supported format, as the run formatted its training rows."""
    if fmt == "alpaca":
        return folder.template.format(str(row["instruction"]), row.get("input"))
    if fmt == "prompt_completion":
        return str(row["prompt"])
    from kotune.data.chat_rows import row_tools

    return chat_prompt(tokenizer, prompt_messages(row, fmt, where), folder.config.data, row_tools(row, where))


# -- encode -----------------------------------------------------------------------------------------
def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids as training encoded them: the text alone, BOS in front when the tokenizer adds one."""
    from kotune.data.encoding import bos_id_to_add, encode_segments

    ids = encode_segments(tokenizer, [text])[0]
    bos = bos_id_to_add(tokenizer)
    if bos is not None and (not ids or ids[0] != bos):  # a chat template may already start with BOS
        ids = [bos, *ids]
    return ids


# -- prefill, decode step, sample -------------------------------------------------------------------
def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, so every row's next token lands in the last column."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


@functools.cache
def cache_name() -> str:
    """The KV cache's keyword and output field: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def prefill(model, ids: torch.Tensor, mask: torch.Tensor):
    """Run the prompts; returns the last position's logits (float32) and the KV cache."""
    from kotune.fast.generation import positions

    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float(), getattr(out, cache_name())


def decode_step(model, token: torch.Tensor, mask: torch.Tensor, cache):
    """One new token per row through the cache; ``mask`` already covers it. Returns logits and the cache."""
    position = mask.sum(-1, keepdim=True) - 1
    name = cache_name()
    out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True, **{name: cache})
    return out.logits[:, -1].float(), getattr(out, name)


class ModelSteps:
    """Prefill and decode steps through transformers' own forward and its growing cache (where
    :class:`kotune.fast.generation.FastGenerator` does not apply: the CPU, other families)."""

    def __init__(self, model):
        self.model = model

    def start(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        self.mask = mask
        logits, self.cache = prefill(self.model, ids, mask)
        return logits

    def step(self, token: torch.Tensor, going: torch.Tensor) -> torch.Tensor:
        """One token per row; rows not ``going`` (stopped) feed theirs masked out."""
        import torch

        self.mask = torch.cat([self.mask, going.to(self.mask.dtype)[:, None]], dim=-1)
        logits, self.cache = decode_step(self.model, token, self.mask, self.cache)
        return logits

    def drop(self, keep: torch.Tensor) -> None:
        """Keep only the batch rows ``keep`` (the others stopped): their cache and mask shrink."""
        self.cache.reorder_cache(keep)
        self.mask = self.mask[keep]

    def release(self) -> None:
        self.cache = None


def steps_for(model):
    """The fast path's generator (``kotune.fast.generation``) where it applies (CUDA, a family it computes
    exactly), else :class:`ModelSteps`. Both have ``start``, ``step``, ``release``; only :class:`ModelSteps`
    drops stopped rows (the fast one keeps the batch's shape, so its recorded decode step serves every token)."""
    from kotune.fast.generation import fast_generator

    return fast_generator(model) or ModelSteps(model)


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else nucleus sampling at the given temperature."""
    import torch

    if sampling.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Drop tokens once the mass before them reaches top_p; the most likely token always stays.
    drop = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    choice = torch.multinomial(sorted_probs.cpu(), 1, generator=generator).to(logits.device)
    return order.gather(-1, choice).squeeze(-1)


class SeenTokens:
    """Per row, which token ids its prompt and reply hold so far (for the repetition penalty)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, vocab: int):
        import torch

        self.seen = torch.zeros((ids.shape[0], vocab), dtype=torch.bool, device=ids.device)
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
        real = mask.bool()
        self.seen[rows[real], ids[real]] = True  # padding is not part of any row's text

    def add(self, token: torch.Tensor) -> None:
        import torch

        self.seen[torch.arange(len(token), device=token.device), token] = True

    def penalize(self, logits: torch.Tensor, penalty: float) -> torch.Tensor:
        import torch

        return torch.where(self.seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def decode(
    model,
    prompts: list[list[int]],
    pad_id: int,
    stops: list[int],
    sampling: Sampling,
    generator: torch.Generator | None = None,
) -> Iterator[list[int | None]]:
    """Per step, the token each row produced (its stop token included), None for rows that already stopped."""
    import torch

    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    steps = steps_for(model)
    with torch.no_grad():
        logits = steps.start(ids, mask, sampling.max_new_tokens)
    # the original row of each row still in the batch: with transformers' steps a row that stopped leaves the
    # batch and the cache, so a few long replies do not keep every row computing to max_new_tokens
    rows = list(range(len(prompts)))
    going = torch.ones(len(prompts), dtype=torch.bool, device=device)
    stop_tensor = torch.tensor(stops, dtype=torch.long, device=device)
    seen = SeenTokens(ids, mask, logits.shape[-1]) if sampling.repetition_penalty != 1.0 else None
    try:
        for step in range(sampling.max_new_tokens):
            if seen is not None:
                logits = seen.penalize(logits, sampling.repetition_penalty)
            token = sample(logits, sampling, generator)
            if seen is not None:
                seen.add(token)
            produced: list[int | None] = [None] * len(prompts)
            for row, t, live in zip(rows, token.tolist(), going.tolist(), strict=True):
                produced[row] = t if live else None
            yield produced
            going &= ~torch.isin(token, stop_tensor)
            if not going.any() or step + 1 == sampling.max_new_tokens:
                return
            if not going.all() and isinstance(steps, ModelSteps):
                keep = going.nonzero().squeeze(1)
                steps.drop(keep)
                rows = [rows[i] for i in keep.tolist()]
                token, going = token[keep], going[keep]
                if seen is not None:
                    seen.seen = seen.seen[keep]
            with torch.no_grad():
                logits = steps.step(token, going)
    finally:
        steps.release()


# -- strip ------------------------------------------------------------------------------------------
def generate(
    model,
    prompts: list[list[int]],
    pad_id: int,
    stops: list[int],
    sampling: Sampling,
    generator: torch.Generator | None = None,
) -> list[Generation]:
    """Batched generation (left padding): each row's new ids up to, not including, its stop token."""
    out: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    stop_set = set(stops)
    for step in decode(model, prompts, pad_id, stops, sampling, generator):
        for i, token in enumerate(step):
            if token is None:
                continue
            if token in stop_set:
                stopped[i] = True
            else:
                out[i].append(token)
    return [Generation(ids, done) for ids, done in zip(out, stopped, strict=True)]


def stream(
    model,
    prompt: list[int],
    pad_id: int,
    stops: list[int],
    sampling: Sampling,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """One prompt's new token ids as they come, ending before the stop token."""
    for (token,) in decode(model, [prompt], pad_id, stops, sampling, generator):
        if token is None or token in stops:
            return
        yield token


MAX_CUT_TOKENS = 3
"""Most trailing tokens to drop for a cut-off character: of a UTF-8 character's 4 bytes at most, 3 can be there
without the last."""


def completion_text(tokenizer, ids: list[int]) -> str:
    """The reply's text: special tokens dropped, no clean-up of spaces, and a character cut off at the end (a reply
    stopped by ``max_new_tokens`` inside a Hangul syllable, whose bytes span tokens) held back instead of shown as
    U+FFFD."""
    for cut in range(min(MAX_CUT_TOKENS, len(ids)) + 1):
        text = tokenizer.decode(ids[: len(ids) - cut], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if not text.endswith("\ufffd"):
            return text
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class TextStream:
    """Turn streamed token ids into text pieces, holding back tokens that end inside a UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0

    def push(self, token: int) -> str:
        """Add a token; returns the text that became complete (maybe empty)."""
        self.ids.append(token)
        text = self.text()
        piece, self.shown = text[self.shown :], len(text)
        return piece

    def text(self) -> str:
        return completion_text(self.tokenizer, self.ids)
