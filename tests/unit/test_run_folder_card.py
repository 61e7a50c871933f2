"""A run folder holds no blank model card: peft's template ``README.md`` (every field "[More Information Needed]",
the local base path as ``base_model``) is removed when the final adapter is written; a card someone wrote stays."""

from __future__ import annotations

from kotune.run_folder import MODEL_CARD, PEFT_BLANK_CARD, drop_blank_card


def test_peft_blank_card_is_removed_and_a_written_card_kept(tmp_path):
    blank = (
        f"---\nbase_model: /home/me/base\nlibrary_name: peft\n---\n\n{PEFT_BLANK_CARD}\n\n[More Information Needed]\n"
    )
    (tmp_path / MODEL_CARD).write_text(blank, encoding="utf-8")
    assert drop_blank_card(tmp_path) and not (tmp_path / MODEL_CARD).exists()
    assert not drop_blank_card(tmp_path)  # nothing there: nothing to do
    (tmp_path / MODEL_CARD).write_text("# My adapter\n\nTrained on our support tickets.\n", encoding="utf-8")
    assert not drop_blank_card(tmp_path) and (tmp_path / MODEL_CARD).is_file()


def test_the_installed_peft_still_writes_the_blank_card_this_recognises(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"])
    )
    model.save_pretrained(tmp_path)
    assert drop_blank_card(tmp_path)
