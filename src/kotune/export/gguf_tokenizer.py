"""A tokenizer as GGUF's ``tokenizer.ggml.*`` keys, checked before any file is written.

Two of llama.cpp's tokenizer models are written:

* ``gpt2``, byte-level BPE (Llama 3, Qwen, SmolLM2): a vocabulary over GPT-2's 256 byte characters, merges, and a
  pre-tokenizer regex it knows by name.
* ``llama``, SentencePiece (Gemma 3): pieces with ``▁`` for a space, ``<0xNN>`` byte pieces for what no piece
  covers, and a score per piece; llama.cpp joins the adjacent pair whose joined piece scores highest. transformers
  keeps such a tokenizer as BPE merges in rank order (its converter ranks them by the joined piece's score), so
  the score written is minus the rank of the first merge that makes the piece, which joins the same pairs in the
  same order.

``gguf_tokenizer`` reads a transformers tokenizer into what the file will hold, or refuses it naming the part
llama.cpp would read differently; ``write_tokenizer`` adds it to a writer.

One tokenizer can be saved in several equivalent shapes. transformers 5.17 converts SmolLM2's GGUF tokenizer with
a ``Sequence`` decoder (ByteFallback, Fuse, Replace ``▁``, ByteLevel) and ``byte_fallback`` on; 5.24 writes a plain
``ByteLevel`` decoder. On a byte-level vocabulary the extra steps change nothing (no ``<0xNN>`` token for
ByteFallback to read, no ``▁`` in any token to replace, Fuse only joins what ByteLevel joins), so both are accepted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from kotune.data.encoding import LLAMA3_SPLIT
from kotune.errors import KotuneError


class ExportError(KotuneError, ValueError):
    """A model or folder kotune cannot export; the message names the architecture, tokenizer part or file."""


# Pre-tokenizer regexes of tokenizer.json → the name llama.cpp knows them by (``tokenizer.ggml.pre``); it picks
# its own copy of the same regex from that name. ``gpt-2`` is a ByteLevel pre-tokenizer with its built-in regex.
# Qwen2's regex is Llama-3's with digits split one by one.
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}

# llama.cpp's token types (``gguf.TokenType``)
NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 3, 4, 5, 6

BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
"""A SentencePiece byte token, which a ByteFallback decoder turns into its byte."""


@dataclass(frozen=True)
class GgufTokenizer:
    """Everything ``write_tokenizer`` puts into the file, read and checked before the file is opened."""

    pre: str | None
    """llama.cpp's name of the pre-tokenizer regex (``tokenizer.ggml.pre``; None for SentencePiece)."""
    tokens: list[str]
    types: list[int]
    merges: list[str]
    eos_id: int
    eot_id: int | None
    bos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    chat_template: str | None
    model: str = "gpt2"
    """llama.cpp's tokenizer model: ``gpt2`` (byte-level BPE, merges) or ``llama`` (SentencePiece, scores)."""
    scores: list[float] | None = None
    """Each piece's score (``llama`` only): minus the rank of the first merge that makes it."""


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; an error for one it has no exact match for."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = parts[0].get("pattern", {}).get("Regex")
        if regex in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[regex]
    raise ExportError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one kotune can name for llama.cpp "
        f"(GPT-2 byte-level, Llama-3 or Qwen2 split); llama.cpp would split text differently from training"
    )


def decoder_no_op(step: dict, vocab: dict) -> bool:
    """Whether a decoder step before ByteLevel leaves every token of a byte-level ``vocab`` as it is."""
    kind = step.get("type")
    if kind == "Fuse":  # joins the token strings; ByteLevel joins them anyway
        return True
    if kind == "ByteFallback":
        return not any(BYTE_TOKEN.fullmatch(token) for token in vocab)
    if kind == "Replace":
        pattern = (step.get("pattern") or {}).get("String")
        return pattern is not None and not any(pattern in token for token in vocab)
    return False


def check_byte_level(tokenizer_json: dict) -> None:
    """Refuse a tokenizer that is not byte-level BPE as llama.cpp's ``gpt2`` model reads it, naming what differs."""
    model, decoder = tokenizer_json.get("model") or {}, tokenizer_json.get("decoder") or {}
    steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    found = f"{model.get('type')} with a {decoder.get('type')} decoder"
    if model.get("type") == "BPE" and steps and steps[-1].get("type") == "ByteLevel":
        vocab = model.get("vocab") or {}
        extra = [s.get("type") for s in steps[:-1] if not decoder_no_op(s, vocab)]
        if not extra:
            return
        found += f" whose {', '.join(map(str, extra))} step changes tokens before ByteLevel"
    raise ExportError(
        f"kotune exports byte-level BPE tokenizers (Llama-3, SmolLM2, Qwen2); this one is {found} "
        "(SentencePiece-style tokenizers are not exported yet)"
    )


SPACE_PIECE = "\u2581"


def sentencepiece_parts(tokenizer_json: dict) -> list[str]:
    """What of a SentencePiece-style BPE tokenizer llama.cpp's ``llama`` model would read differently (empty: it
    reads it as transformers does): a space must become ``▁`` and nothing else change the text, nothing may split
    it first, bytes no piece covers must fall back to ``<0xNN>`` pieces, and decoding must undo exactly that."""
    model, normalizer = tokenizer_json.get("model") or {}, tokenizer_json.get("normalizer") or {}
    pre, decoder = tokenizer_json.get("pre_tokenizer") or {}, tokenizer_json.get("decoder") or {}
    space = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE_PIECE}
    differs = []
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        differs.append(f"a {model.get('type')} model without byte fallback")
    if normalizer != space:
        differs.append(f"normalizer {json.dumps(normalizer)[:120]}")
    # a split on " " after the normalizer turned every space into ▁ splits nothing
    if pre and not (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "}):
        differs.append(f"pre-tokenizer {json.dumps(pre)[:120]}")
    steps = [d.get("type") for d in decoder.get("decoders", [])] if decoder.get("type") == "Sequence" else []
    if steps != ["Replace", "ByteFallback", "Fuse"] or decoder["decoders"][0].get("pattern") != {"String": SPACE_PIECE}:
        differs.append(f"decoder {json.dumps(decoder)[:120]}")
    return differs


def is_sentencepiece(tokenizer_json: dict) -> bool:
    """A BPE tokenizer with byte fallback and no byte-level step: SentencePiece's form in transformers."""
    model, decoder = tokenizer_json.get("model") or {}, tokenizer_json.get("decoder") or {}
    steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    return (
        model.get("type") == "BPE"
        and bool(model.get("byte_fallback"))
        and "ByteLevel" not in {s.get("type") for s in steps}
    )


def piece_scores(tokens: list[str], merges: list) -> list[float]:
    """Minus the rank of the first merge that makes each piece; pieces no merge makes (characters, bytes, added
    tokens) score below every merge, so llama.cpp joins them into nothing before transformers would."""
    rank: dict[str, int] = {}
    for i, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, i)
    floor = -float(len(merges) + 1)
    return [-float(rank[t]) if t in rank else floor for t in tokens]


def tokenizer_vocab(tokenizer, vocab_size: int, byte_pieces: bool = False) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids 0..vocab_size-1 (ids with no token: ``[PADn]``, unused);
    ``byte_pieces``: a SentencePiece vocabulary, whose ``<0xNN>`` pieces are bytes (in a byte-level one such a
    string would be text)."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has token id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(CONTROL if added[i].special else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(BYTE if byte_pieces and BYTE_TOKEN.fullmatch(by_id[i]) else NORMAL)
    return tokens, types


def gguf_tokenizer(tokenizer, vocab_size: int, stop_ids: list[int], chat_template: str | None) -> GgufTokenizer:
    """The GGUF form of a byte-level BPE or a SentencePiece tokenizer: EOS is the tokenizer's, end-of-turn the first
    other stop id."""
    from kotune.data.encoding import bos_id_to_add

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    sentencepiece = is_sentencepiece(data)
    if sentencepiece and (differs := sentencepiece_parts(data)):
        raise ExportError(
            f"this SentencePiece-style tokenizer has {'; '.join(differs)}: llama.cpp would split text differently "
            "from training (kotune exports Gemma 3's form: spaces as ▁, byte fallback, no pre-splitting)"
        )
    if not sentencepiece:
        check_byte_level(data)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ExportError("the tokenizer has no EOS token: llama.cpp would not know where a reply ends")
    tokens, types = tokenizer_vocab(tokenizer, vocab_size, byte_pieces=sentencepiece)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    return GgufTokenizer(
        pre=None if sentencepiece else pre_tokenizer_name(data),
        tokens=tokens,
        types=types,
        merges=[] if sentencepiece else merges,
        eos_id=eos,
        eot_id=next((i for i in stop_ids if i != eos), None),
        bos_id=tokenizer.bos_token_id,
        pad_id=tokenizer.pad_token_id,
        unk_id=tokenizer.unk_token_id,
        add_bos=bos_id_to_add(tokenizer) is not None,
        chat_template=chat_template,
        model="llama" if sentencepiece else "gpt2",
        scores=piece_scores(tokens, merges) if sentencepiece else None,
    )


def write_tokenizer(writer, spec: GgufTokenizer) -> None:
    """Vocabulary, merges, special ids and chat template under llama.cpp's ``tokenizer.ggml.*`` keys."""
    writer.add_tokenizer_model(spec.model)
    if spec.pre is not None:
        writer.add_tokenizer_pre(spec.pre)
    writer.add_token_list(spec.tokens)
    writer.add_token_types(spec.types)
    if spec.scores is not None:
        writer.add_token_scores(spec.scores)
        writer.add_add_space_prefix(False)  # the normalizer puts no ▁ in front of the text
    if spec.merges:
        writer.add_token_merges(spec.merges)
    writer.add_eos_token_id(spec.eos_id)
    if spec.eot_id is not None:
        writer.add_eot_token_id(spec.eot_id)
    if spec.bos_id is not None:
        writer.add_bos_token_id(spec.bos_id)
    if spec.pad_id is not None:
        writer.add_pad_token_id(spec.pad_id)
    if spec.unk_id is not None:
        writer.add_unk_token_id(spec.unk_id)
    writer.add_add_bos_token(spec.add_bos)
    writer.add_add_eos_token(False)  # kotune never appends EOS to a prompt
    if spec.chat_template:
        writer.add_chat_template(spec.chat_template)
