"""The offline unit tier: a byte-level mock tokenizer built in-process and tiny random Llama models on it.

Nothing here reads ``~/.cache/kotune`` or the network: every test in ``tests/unit`` runs with outbound
connections refused and kotune's cache in an empty folder (``offline``), so a test that would download fails
instead of quietly fetching.

The mock tokenizer maps each UTF-8 byte to the id of its value (``a`` -> 97, ``한`` -> 237, 149, 156), with
``<pad>`` 256, ``<s>`` (BOS) 257, ``</s>`` (EOS) 258 and ``<|end|>`` 259 (an end-of-turn token), so every
expected id and label in these tests can be written down by hand from the text.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

PAD, BOS, EOS, END = 256, 257, 258, 259
SPECIALS = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<|end|>": END}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<' + message['role'] + '>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)
"""Each turn as ``<role>content<|end|>``: the end-of-turn token closes every turn, as in Llama-3's template."""


def ids(text: str) -> list[int]:
    """What the mock tokenizer gives ``text`` (no special tokens in it): its UTF-8 bytes."""
    return list(text.encode("utf-8"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of a byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_mock_tokenizer(folder: Path, chat_template: str | None = CHAT_TEMPLATE) -> str:
    """A byte-level tokenizer (no merges) that adds BOS like Llama's, saved in ``folder``; returns the folder."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|end|>"],
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


def build_tiny_model(folder: Path, tokenizer_dir: str, hidden: int = 32, layers: int = 2, seed: int = 0) -> str:
    """A randomly initialised Llama-architecture model with the mock tokenizer, saved as a plain folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Weights drawn here, by name, from one seeded generator: they depend on torch's generator only, not on how a
    # transformers release initialises (or in which order), so the pinned run is the same on any release.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, param in sorted(model.named_parameters()):
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            else:  # RMSNorm weights
                param.fill_(1.0)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


# Package scope throughout: the guard below is undone when the tier's tests are done (it must not leak into the
# integration tests of the same session), and fixtures of one scope start with the autouse one.
@pytest.fixture(scope="package", autouse=True)
def offline(tmp_path_factory):
    """Refuse outbound connections while the unit tier runs, and point kotune's cache at an empty folder, so no
    test can download or read ``~/.cache/kotune`` without failing."""

    def refuse(*args, **kwargs):
        raise OSError("tests/unit is offline: a test tried to open a network connection")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("KOTUNE_CACHE", str(tmp_path_factory.mktemp("kotune-cache")))
        yield


@pytest.fixture(scope="package")
def mock_dir(tmp_path_factory) -> str:
    return build_mock_tokenizer(tmp_path_factory.mktemp("mock-tokenizer"))


@pytest.fixture(scope="package")
def mock_tokenizer(mock_dir):
    """The mock tokenizer as ``kotune train`` loads it (pad token, right padding)."""
    from kotune.config import ModelConfig
    from kotune.model.load import load_tokenizer

    return load_tokenizer(mock_dir, ModelConfig())


@pytest.fixture(scope="package")
def tiny_model_dir(tmp_path_factory, mock_dir) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-mock-llama"), mock_dir)
