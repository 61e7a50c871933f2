"""GRPO's prompt rows (``kotune.data.prompts``) and rollouts (``kotune.rl.rollout``) on the mock tokenizer and a
tiny random model: prompts encoded as inference encodes them, conversations ending in the template's generation
prompt, the audit's findings; completions seeded per (step, row, index), so a completion does not depend on the
batch it was sampled in (how several processes sample the same step), stop strings, and the sampler's
log-probabilities equal to a plain forward's."""

from __future__ import annotations

import json

import pytest
import torch

from kotune.config_load import load_config
from kotune.data.audit import summary_lines
from kotune.data.prompts import prepare_prompts
from kotune.rl.rollout import Sampler, completion_seed, rollout

from .conftest import BOS, EOS, PAD, ids


def config(tmp_path, rows, *overrides):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    values = [f"data.path={path}", "data.val_size=0", "train.objective=grpo", "data.cutoff_len=64",
              "grpo.max_new_tokens=8", *overrides]  # fmt: skip
    return load_config(None, values)


def test_prompt_and_messages_rows_are_encoded_as_inference_encodes_them(tmp_path, mock_tokenizer):
    rows = [
        {"prompt": "3+4=", "answer": "7"},
        {"messages": [{"role": "user", "content": "합?"}, {"role": "assistant", "content": "7"}], "answer": 7},
    ]
    data = prepare_prompts(config(tmp_path, rows), mock_tokenizer)
    plain, chat = sorted(data.train, key=lambda p: p.row)
    assert plain.ids == [BOS, *ids("3+4=")] and plain.fields["answer"] == "7"
    # the final assistant turn is the reference, left out; the generation prompt closes the prompt
    assert chat.text == "<user>합?<|end|><assistant>" and chat.ids[0] == BOS
    assert not [f for f in data.audits[0].findings if f.level != "info"]
    assert summary_lines(data.audits[0])[0].endswith("prompts only: GRPO trains on the completions it samples")


def test_the_audit_names_rows_without_an_answer_and_prompts_too_long(tmp_path, mock_tokenizer):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}, {"prompt": "x" * 60, "answer": "1"}]
    data = prepare_prompts(config(tmp_path, rows), mock_tokenizer)
    found = {f.code: f for f in data.audits[0].findings}
    assert found["no_answer"].level == "fatal" and found["no_answer"].rows == [1]
    assert found["prompt_too_long"].level == "fatal" and found["prompt_too_long"].rows == [2]
    assert "grpo.max_new_tokens=8" in found["prompt_too_long"].message


def test_a_template_whose_generation_prompt_is_not_the_turn_start_is_fatal(tmp_path, mock_tokenizer):
    bad = tmp_path / "bad.jinja"
    bad.write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<bot>{% endif %}",
        encoding="utf-8",
    )
    rows = [{"messages": [{"role": "user", "content": "hi"}], "answer": "1"}]
    data = prepare_prompts(config(tmp_path, rows, f"data.chat_template={bad}"), mock_tokenizer)
    assert [f.code for f in data.audits[0].findings if f.level == "fatal"] == ["generation_prompt"]


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def sampler(**changes) -> Sampler:
    values = {"pad_id": PAD, "stop_ids": (EOS,), "stop_strings": (), "max_new_tokens": 6, "temperature": 1.0,
              "top_p": 1.0, **changes}  # fmt: skip
    return Sampler(**values)


def test_a_completion_depends_on_its_seed_not_on_its_batch(tiny_model, mock_tokenizer):
    prompts = [[BOS, *ids("1+1=")], [BOS, *ids("a much longer prompt")], [BOS, *ids("2+2=")]]
    seeds = [completion_seed(42, 3, row, 0) for row in range(3)]
    together = rollout(tiny_model, mock_tokenizer, prompts, seeds, sampler())
    alone = [rollout(tiny_model, mock_tokenizer, [p], [s], sampler())[0] for p, s in zip(prompts, seeds, strict=True)]
    assert [c.ids for c in together] == [c.ids for c in alone]
    for a, b in zip(together, alone, strict=True):
        assert a.logps == pytest.approx(b.logps, abs=1e-5)
    again = rollout(tiny_model, mock_tokenizer, prompts, [completion_seed(42, 4, r, 0) for r in range(3)], sampler())
    assert [c.ids for c in again] != [c.ids for c in together]  # the next step draws afresh
    assert completion_seed(42, 3, 0, 0) != completion_seed(42, 3, 0, 1)


def test_sampler_log_probs_are_the_models_and_stop_strings_end_a_completion(tiny_model, mock_tokenizer):
    prompt = [BOS, *ids("1+1=")]
    (done,) = rollout(tiny_model, mock_tokenizer, [prompt], [7], sampler(temperature=0.7))
    with torch.no_grad():
        logits = tiny_model(torch.tensor([prompt + done.ids])).logits[0, len(prompt) - 1 : -1] / 0.7
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(done.ids)[:, None]).squeeze(-1)
    assert done.logps == pytest.approx(expected.tolist(), abs=1e-5)
    # a stop string made of the first sampled character ends the completion right there, kept in it
    first = mock_tokenizer.decode(done.ids[:1])
    (cut,) = rollout(tiny_model, mock_tokenizer, [prompt], [7], sampler(temperature=0.7, stop_strings=(first,)))
    assert cut.ids == done.ids[:1] and cut.stopped


def test_completion_batch_labels_only_trained_completions_and_aligns_sampled_log_probs():
    """Prompt + completion right-padded; labels on the completion tokens (stop token included); a row not trained
    (``grpo.mask_truncated``: cut by max_new_tokens) has no label at all; the sampler's log-prob of each completion
    token sits at that token's position, where the loss reads its training log-prob after the shift."""
    from kotune.rl.rollout import Completion
    from kotune.training.grpo import completion_batch

    prompts = [[BOS, 1, 2], [BOS, 3]]
    done = [Completion([7, EOS], [-0.5, -0.25], True), Completion([8, 9, 10], [-1.0, -2.0, -3.0], False)]
    batch = completion_batch(prompts, done, PAD, trained=[True, False])
    assert batch["input_ids"].tolist() == [[BOS, 1, 2, 7, EOS], [BOS, 3, 8, 9, 10]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1] * 5]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, EOS], [-100] * 5]
    assert batch["sampled_logps"][0].tolist() == [0.0, 0.0, 0.0, -0.5, -0.25]
    assert batch["sampled_logps"][1, 2:].tolist() == [-1.0, -2.0, -3.0]
