"""kotune data preview: Korean shows as whole syllables, never U+FFFD, with trained and masked tokens apart."""

from __future__ import annotations

from kotune.commands.data import render_example, token_pieces
from kotune.data.examples import IGNORE, Example
from kotune.data.templates import KO_ALPACA


def test_preview_shows_whole_hangul_syllables_and_keeps_the_mask(llama3_tokenizer):
    prompt = llama3_tokenizer.encode(KO_ALPACA.format("하늘은 왜 파란가요? 뷁"), add_special_tokens=False)
    response = llama3_tokenizer.encode("햇빛이 산란하기 때문입니다. 똠방각하 😊", add_special_tokens=False)
    assert any("\ufffd" in llama3_tokenizer.decode([t]) for t in prompt + response), "the row must split syllables"
    example = Example(0, prompt + response, [IGNORE] * len(prompt) + response)
    pieces = token_pieces(llama3_tokenizer, example)
    assert not any("\ufffd" in text for text, _ in pieces)
    assert "".join(text for text, trained in pieces if trained) == llama3_tokenizer.decode(response)
    assert "".join(text for text, trained in pieces if not trained) == llama3_tokenizer.decode(prompt)
    shown = render_example(example, llama3_tokenizer, color=False)
    body = shown.split("\n", 1)[1].rstrip("\n")
    assert "\ufffd" not in body and body.startswith("[")  # masked pieces bracketed
    assert body.endswith("]햇빛이 산란하기 때문입니다. 똠방각하 😊")  # trained pieces plain
