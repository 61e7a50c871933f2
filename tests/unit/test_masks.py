"""Exact labels, written down by hand with the byte-level mock tokenizer: the prompt is masked, the response and
its EOS are trained, and the cutoff cuts ids and labels together (counting rows that lost their EOS).

Rows go through ``prepare``, the path ``kotune train`` takes from a config to examples.
"""

from __future__ import annotations

import pytest

from kotune.data.examples import IGNORE
from kotune.data.prepare import prepare

from .conftest import BOS, END, EOS, ids

# The English alpaca template (Stanford alpaca's wording), written out here so the test checks the text too.
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def quiet(_: str) -> None:
    pass


def encode(data_config, tokenizer, rows, *overrides, name="data.jsonl"):
    return prepare(data_config(rows, *overrides, name=name).data, tokenizer, log=quiet)


def masked(n: int) -> list[int]:
    return [IGNORE] * n


def test_alpaca_prompt_is_masked_and_response_with_eos_trained(data_config, mock_tokenizer):
    rows = [{"instruction": "Say hi", "input": "", "output": "Hi!"}]
    (example,) = encode(data_config, mock_tokenizer, rows, "data.template=alpaca").train
    prompt = ids(NO_INPUT.format(instruction="Say hi"))
    assert example.input_ids == [BOS, *prompt, *ids("Hi!"), EOS]
    assert example.labels == [*masked(1 + len(prompt)), *ids("Hi!"), EOS]


def test_alpaca_input_uses_the_input_prompt_and_blank_input_the_other(data_config, mock_tokenizer):
    rows = [
        {"instruction": "Sum", "input": "1 2", "output": "3"},
        {"instruction": "Sum", "input": "  \n", "output": "0"},
        {"instruction": "Sum", "output": "0"},  # no input column in this row
    ]
    # Rows 1 and 2 render alike (that is the point): keep both, though they are duplicates.
    data = encode(data_config, mock_tokenizer, rows, "data.template=alpaca", "data.dedup=off")
    by_row = {e.row: e for e in data.train}
    with_input = ids(WITH_INPUT.format(instruction="Sum", input="1 2"))
    assert by_row[0].input_ids == [BOS, *with_input, *ids("3"), EOS]
    assert by_row[0].labels == [*masked(1 + len(with_input)), *ids("3"), EOS]
    no_input = ids(NO_INPUT.format(instruction="Sum"))
    for row in (1, 2):
        assert by_row[row].input_ids == [BOS, *no_input, *ids("0"), EOS]
        assert by_row[row].labels == [*masked(1 + len(no_input)), *ids("0"), EOS]


def test_korean_alpaca_template_ends_the_prompt_without_a_space(data_config, mock_tokenizer):
    rows = [{"instruction": "인사", "input": "", "output": "\n안녕"}]  # a response opening with a newline
    (example,) = encode(data_config, mock_tokenizer, rows).train  # data.template defaults to ko-alpaca
    prompt = ids(
        "아래는 문제를 설명하는 지시사항입니다. 이 요청에 대해 적절하게 답변해주세요.\n###지시사항:인사\n###답변:"
    )
    assert example.input_ids == [BOS, *prompt, *ids("\n안녕"), EOS]
    assert example.labels == [*masked(1 + len(prompt)), *ids("\n안녕"), EOS]


def test_train_on_inputs_trains_the_prompt_but_never_bos(data_config, mock_tokenizer):
    rows = [{"instruction": "Say hi", "input": "", "output": "Hi!"}]
    (example,) = encode(data_config, mock_tokenizer, rows, "data.template=alpaca", "data.train_on_inputs=true").train
    assert example.labels == [IGNORE, *example.input_ids[1:]]
    assert example.input_ids[-1] == EOS


def test_prompt_completion_masks_the_prompt(data_config, mock_tokenizer):
    (example,) = encode(data_config, mock_tokenizer, [{"prompt": "Q: 2+2?", "completion": " 4"}]).train
    assert example.input_ids == [BOS, *ids("Q: 2+2?"), *ids(" 4"), EOS]
    assert example.labels == [*masked(1 + len("Q: 2+2?")), *ids(" 4"), EOS]


# One alpaca row: BOS (1) + prompt + "Hi!" (3) + EOS (1).
ROW = {"instruction": "Say hi", "input": "", "output": "Hi!"}
PROMPT_LEN = 1 + len(ids(NO_INPUT.format(instruction="Say hi")))


def test_cutoff_at_the_full_length_keeps_everything(data_config, mock_tokenizer):
    data = encode(data_config, mock_tokenizer, [ROW], "data.template=alpaca", f"data.cutoff_len={PROMPT_LEN + 4}")
    (example,) = data.train
    assert len(example.input_ids) == PROMPT_LEN + 4 and example.labels[-1] == EOS
    assert (data.train_stats.truncated, data.train_stats.eos_lost) == (0, 0)


def test_cutoff_inside_the_response_cuts_ids_and_labels_and_loses_the_eos(data_config, mock_tokenizer):
    data = encode(data_config, mock_tokenizer, [ROW], "data.template=alpaca", f"data.cutoff_len={PROMPT_LEN + 2}")
    (example,) = data.train
    assert example.input_ids[PROMPT_LEN:] == ids("Hi")
    assert example.labels == [*masked(PROMPT_LEN), *ids("Hi")]
    stats = data.train_stats
    assert (stats.rows, stats.kept, stats.truncated, stats.eos_lost) == (1, 1, 1, 1)


@pytest.mark.parametrize("cut", [1, PROMPT_LEN])
def test_cutoff_inside_the_prompt_leaves_nothing_to_train_and_skips_the_row(data_config, mock_tokenizer, cut):
    short = {"instruction": "x", "input": "", "output": "y"}
    data = encode(data_config, mock_tokenizer, [ROW, short], "data.template=alpaca", f"data.cutoff_len={cut}")
    stats = data.train_stats
    if cut == 1:  # even the short row has only BOS left
        assert len(data.train) == 0
        assert sorted(stats.skipped_rows["no trained token left after the cutoff"]) == [0, 1]
    else:  # the short row (prompt 4 bytes shorter, response 2 shorter) fits
        assert [e.row for e in data.train] == [1]
        assert stats.skipped_rows == {"no trained token left after the cutoff": [0]}
    assert stats.truncated == (2 if cut == 1 else 1) and stats.eos_lost == 0


CONVERSATION = [
    {"role": "system", "content": "Be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "more"},
    {"role": "assistant", "content": "ok"},
]


def tokens(*parts) -> list[int]:
    """Ids of text parts and special ids in order."""
    return [t for p in parts for t in (ids(p) if isinstance(p, str) else [p])]


def test_conversation_trains_exactly_the_assistant_turns_with_their_end_of_turn(data_config, mock_tokenizer):
    (example,) = encode(data_config, mock_tokenizer, [{"messages": CONVERSATION}]).train
    assert example.input_ids == tokens(
        BOS, "<system>Be brief", END, "<user>hi", END, "<assistant>yo", END, "<user>more", END, "<assistant>ok", END
    )
    lengths = [len(ids(t)) for t in ("<system>Be brief", "<user>hi", "<assistant>", "<user>more", "<assistant>")]
    assert example.labels == [
        *masked(1 + lengths[0] + 1 + lengths[1] + 1 + lengths[2]),
        *tokens("yo", END),
        *masked(lengths[3] + 1 + lengths[4]),
        *tokens("ok", END),
    ]


def test_sharegpt_rows_give_the_same_example_as_messages(data_config, mock_tokenizer):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    turns = [{"from": names[m["role"]], "value": m["content"]} for m in CONVERSATION]
    (sharegpt,) = encode(data_config, mock_tokenizer, [{"conversations": turns}]).train
    (messages,) = encode(data_config, mock_tokenizer, [{"messages": CONVERSATION}], name="m.jsonl").train
    assert (sharegpt.input_ids, sharegpt.labels) == (messages.input_ids, messages.labels)


def test_train_on_all_turns_trains_every_token_but_bos(data_config, mock_tokenizer):
    rows = [{"messages": CONVERSATION}]
    (example,) = encode(data_config, mock_tokenizer, rows, "data.train_on_all_turns=true").train
    assert example.labels == [IGNORE, *example.input_ids[1:]]


def test_conversation_cut_before_its_last_end_of_turn_counts_a_lost_eos(data_config, mock_tokenizer):
    full = len(tokens(BOS, "<user>hi", END, "<assistant>yo", END))
    rows = [{"messages": CONVERSATION[1:3]}]
    data = encode(data_config, mock_tokenizer, rows, f"data.cutoff_len={full - 1}")
    (example,) = data.train
    assert example.labels[-2:] == tokens("y", "o") and END not in example.labels
    assert (data.train_stats.truncated, data.train_stats.eos_lost) == (1, 1)


def test_conversation_without_an_assistant_turn_is_skipped_and_counted(data_config, mock_tokenizer):
    rows = [{"messages": CONVERSATION[:2]}, {"messages": CONVERSATION[1:3]}]
    data = encode(data_config, mock_tokenizer, rows)
    assert [e.row for e in data.train] == [1]
    assert data.train_stats.skipped_rows == {"no assistant turn": [0]}
