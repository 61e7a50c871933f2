"""Preference rows on the mock tokenizer: BOS stays in front of a cut prompt also when the chat template writes it
as text, a file with a ``system`` column is conversational on every row, and KTO labels are read in their common
spellings (the rest named with their row)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kotune.config_load import load_config
from kotune.data.preference import render_pairs
from kotune.data.read import DataError
from kotune.data.templates import load_template
from kotune.model.load import load_tokenizer
from tests.unit.conftest import BOS, CHAT_TEMPLATE, END, build_mock_tokenizer, ids

LONG = "a long question " * 8


def config(mock_dir: str, max_prompt_len: int = 16):
    values = [f"model.path={mock_dir}", "data.path=rows.jsonl", "train.objective=dpo", "data.cutoff_len=64"]
    return load_config(None, [*values, f"preference.max_prompt_len={max_prompt_len}"])


def render(rows: list[dict], tokenizer, cfg):
    rows = [{**row, "_row": i, "_source": f"rows.jsonl line {i + 1}"} for i, row in enumerate(rows)]
    return render_pairs(rows, cfg, load_template(cfg.data.template), tokenizer, "rows.jsonl")


@pytest.fixture(scope="module")
def bos_as_text(tmp_path_factory) -> str:
    """The mock tokenizer adding no BOS itself, with a chat template that writes ``<s>`` as text in front."""
    folder = Path(build_mock_tokenizer(tmp_path_factory.mktemp("bos-text"), "{{ bos_token }}" + CHAT_TEMPLATE))
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    spec["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return str(folder)


@pytest.mark.parametrize("unpaired", [False, True], ids=["pairs", "kto rows"])
def test_a_cut_prompt_keeps_the_bos_its_chat_template_wrote(bos_as_text, unpaired):
    from kotune.config import ModelConfig

    tokenizer = load_tokenizer(bos_as_text, ModelConfig())
    assert tokenizer("a")["input_ids"] == ids("a")  # the tokenizer adds no BOS: only the template writes it
    replies = {"completion": "yes", "label": True} if unpaired else {"chosen": "yes", "rejected": "no"}
    data = render([{"prompt": [{"role": "user", "content": LONG}], **replies}], tokenizer, config(bos_as_text))
    (pair,) = data.pairs
    assert pair.prompt[0] == BOS and len(pair.prompt) == 16 and data.prompt_cut == [0]
    assert pair.prompt[1:] == [*ids(f"<user>{LONG}"), END, *ids("<assistant>")][-15:]  # the end, next to the reply


def test_a_cut_plain_prompt_keeps_the_bos_the_tokenizer_adds(mock_dir, mock_tokenizer):
    (pair,) = render([{"prompt": LONG, "chosen": "yes", "rejected": "no"}], mock_tokenizer, config(mock_dir)).pairs
    assert pair.prompt == [BOS, *ids(LONG)[-15:]]


def test_a_system_column_makes_every_row_of_the_file_a_conversation(mock_dir, mock_tokenizer):
    rows = [
        {"prompt": "q", "system": "", "chosen": "yes", "rejected": "no"},
        {"prompt": "q", "system": "be brief", "chosen": "yes", "rejected": "no"},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": "yes", "rejected": "no"},
    ]
    empty, brief, messages = render(rows, mock_tokenizer, config(mock_dir, 48)).pairs
    user = [*ids("<user>q"), END, *ids("<assistant>")]
    assert empty.prompt == messages.prompt == [BOS, *user]  # an empty system is no system turn
    assert brief.prompt == [BOS, *ids("<system>be brief"), END, *user]


def test_kto_labels_in_their_common_spellings_and_the_rest_named(mock_dir, mock_tokenizer):
    labels = [True, "true", " False ", 1, 0, "1", "0", "TRUE"]
    rows = [{"prompt": "q", "completion": f"reply {i}", "label": label} for i, label in enumerate(labels)]
    data = render(rows, mock_tokenizer, config(mock_dir))
    assert [r.desirable for r in data.pairs] == [True, True, False, True, False, True, False, True]
    with pytest.raises(DataError, match=r"rows.jsonl line 3 \(row 2\): 'label' is 'yes'"):
        render([*rows[:2], {"prompt": "q", "completion": "r", "label": "yes"}], mock_tokenizer, config(mock_dir))


def test_left_out_rows_and_blank_prompts_are_named_and_a_mostly_unusable_file_is_refused(mock_dir, mock_tokenizer):
    from kotune.data.preference_audit import audit_pairs

    pair = {"prompt": "q", "chosen": "yes", "rejected": "no"}
    rows = [pair, {"prompt": "q", "chosen": "yes"}, {"prompt": "  ", "chosen": "yes", "rejected": "no"}, pair]
    rows += [{"instruction": "an SFT row", "output": "in a pair file"}]
    cfg = config(mock_dir)
    audit = audit_pairs("rows.jsonl", render(rows, mock_tokenizer, cfg), len(rows), 64, 16)
    skipped = {f.message: f.rows for f in audit.findings if f.code == "skipped"}
    assert skipped == {"1 rows left out: null chosen (row 4)": [4], "1 rows left out: null rejected (row 1)": [1]}
    assert [f.rows for f in audit.findings if f.code == "blank_prompt"] == [[2]] and not audit.fatal()
    mostly_sft = [pair] + [{"instruction": f"q{i}", "output": "a"} for i in range(3)]
    audit = audit_pairs("rows.jsonl", render(mostly_sft, mock_tokenizer, cfg), len(mostly_sft), 64, 16)
    (fatal,) = audit.fatal()
    assert fatal.code == "most_rows_left_out" and fatal.rows == [1, 2, 3] and "3 of 4 rows" in fatal.message
