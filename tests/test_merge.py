"""kotune merge: the report's numbers against logits computed here with plain transformers / peft, the merged
weights against dequantize + LoRA delta by hand, greedy agreement, drift refusal, idempotency, sharding."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from kotune import run_folder
from kotune.export import drift as drifting
from kotune.export import merge as merging
from kotune.model.load import nf4_config


@pytest.mark.parametrize("command", ["merge", "chat", "generate", "push"])
def test_help_text_renders(command, capsys):
    from kotune.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: kotune {command}" in capsys.readouterr().out


# -- the drift arithmetic, by hand ------------------------------------------------------------------
def test_drift_sums_hand_values():
    merged = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    adapter = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([-100, 1, 2])  # positions 0 and 1 predict tokens 1 and 2
    sums = drifting.drift_sums(merged, adapter, labels)
    assert sums["abs_diff"] == pytest.approx(3.0)  # 1 at [0,0], 1 at [1,0], 1 at [1,1]
    assert sums["max_abs_diff"] == pytest.approx(1.0)
    assert sums["agree"] == 2  # position 1 picks token 1 vs token 0
    assert sums["positions"] == 3 and sums["elements"] == 9 and sums["tokens"] == 2
    nll = torch.nn.functional.cross_entropy
    assert sums["nll_merged"] == pytest.approx(nll(merged[:2], torch.tensor([1, 2]), reduction="sum").item())
    drift = drifting.summarize([sums, sums])
    assert drift.mean_abs_logit_diff == pytest.approx(3 / 9)
    assert drift.top1_agreement == pytest.approx(2 / 3)
    assert drift.perplexity_adapter == pytest.approx(math.exp(sums["nll_adapter"] / 2))
    assert not drift.within_threshold()


# -- the merge of a 4-bit-trained adapter -----------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_qlora_run):
    """The run's config, validation rows and adapter on the NF4 base, loaded with plain transformers / peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kotune.config_load import load_config
    from kotune.data.prepare import prepare
    from kotune.model.load import keep_4bit_weights_exact

    run, _, _ = tiny_qlora_run
    cfg = load_config(run / "kotune_config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(run)
    rows = prepare(cfg.data, tokenizer).validation
    base = AutoModelForCausalLM.from_pretrained(
        cfg.model.path, quantization_config=nf4_config(torch.float32), dtype=torch.float32
    )
    # as kotune does (test_model_load.py): on AVX512-BF16 CPUs bitsandbytes would otherwise round the NF4
    # constants to bf16 at the first eval forward, and the reference would no longer be the trained model
    keep_4bit_weights_exact(base)
    adapter = PeftModel.from_pretrained(base, run).eval()
    return cfg, rows, adapter


@torch.no_grad()
def independent_drift(merged, adapter, rows) -> dict:
    """Mean |Δ logit|, top-1 agreement and perplexities, with transformers' own loss for the perplexity."""
    abs_sum = elements = agree = positions = nll_m = nll_a = tokens = 0.0
    for e in rows:
        ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
        out_m, out_a = merged(input_ids=ids, labels=labels), adapter(input_ids=ids, labels=labels)
        diff = (out_m.logits - out_a.logits).abs()
        abs_sum, elements = abs_sum + diff.sum().item(), elements + diff.numel()
        agree += (out_m.logits.argmax(-1) == out_a.logits.argmax(-1)).sum().item()
        positions += ids.shape[1]
        n = (labels[0, 1:] != -100).sum().item()
        nll_m, nll_a, tokens = nll_m + out_m.loss.item() * n, nll_a + out_a.loss.item() * n, tokens + n
    return {
        "mean_abs_logit_diff": abs_sum / elements,
        "top1_agreement": agree / positions,
        "perplexity_merged": math.exp(nll_m / tokens),
        "perplexity_adapter": math.exp(nll_a / tokens),
    }


def check_against(report_target: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert report_target[key] == pytest.approx(value, rel=1e-3, abs=1e-7), key


def test_report_numbers_match_independent_logits_for_both_targets(tiny_qlora_run, tiny_merged, reference):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _, _ = tiny_qlora_run
    out, log = tiny_merged
    cfg, rows, adapter = reference
    report = json.loads((out / "merge_report.json").read_text())
    assert report["verification"] == {"split": "validation", "rows": [e.row for e in rows]}
    assert report["into"] == "dequantized" and report["dtype"] == "fp32"
    assert set(report["targets"]) == {"dequantized", "original"}
    assert "merge check, dequantized (chosen)" in log and "merge check, original" in log

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    check_against(report["targets"]["dequantized"], independent_drift(merged, adapter, rows))
    assert report["targets"]["dequantized"]["top1_agreement"] == 1.0
    assert report["targets"]["dequantized"]["within_threshold"] is True

    full = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    original = PeftModel.from_pretrained(full, run).merge_and_unload().eval()
    expected = independent_drift(original, adapter, rows)
    check_against(report["targets"]["original"], expected)
    assert expected["mean_abs_logit_diff"] > 100 * report["targets"]["dequantized"]["mean_abs_logit_diff"]


@pytest.mark.compat("peft", "bitsandbytes")
def test_merged_weights_are_dequantized_nf4_plus_lora_delta(tiny_qlora_run, tiny_merged):
    import bitsandbytes as bnb
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run, _, _ = tiny_qlora_run
    out, _ = tiny_merged
    config = json.loads((run / "adapter_config.json").read_text())
    adapter = load_file(run / "adapter_model.safetensors")
    merged = load_file(out / "model.safetensors")
    base_path = json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"]
    original = load_file(f"{base_path}/model.safetensors")
    quantized = AutoModelForCausalLM.from_pretrained(
        base_path, quantization_config=nf4_config(torch.float32), dtype=torch.float32
    )

    def dequantized(name: str) -> torch.Tensor:
        weight = quantized.get_submodule(name).weight
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)

    prefix = "base_model.model.model.layers.1.self_attn.q_proj"
    a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
    assert b.abs().max() > 1e-3, "the fixture's adapter should have moved away from zero"
    delta = config["lora_alpha"] / config["r"] * b @ a
    q_proj = "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(merged[f"{q_proj}.weight"], dequantized(q_proj) + delta, atol=1e-6, rtol=0)
    assert (merged[f"{q_proj}.weight"] - (original[f"{q_proj}.weight"] + delta)).abs().max() > 1e-4
    # a 4-bit layer without LoRA is the dequantized weight exactly; unquantized tensors are the original's
    gate = "model.layers.0.mlp.gate_proj"
    torch.testing.assert_close(merged[f"{gate}.weight"], dequantized(gate), atol=0, rtol=0)
    torch.testing.assert_close(merged["model.embed_tokens.weight"], original["model.embed_tokens.weight"])


def test_merged_and_adapter_greedy_generations_agree_token_for_token(tiny_qlora_run, tiny_merged, reference):
    from kotune.data.conversations import stop_ids
    from kotune.inference.generate import Sampling, encode_prompt, generate, pad_id
    from kotune.inference.load import load_model
    from kotune.run_folder import open_folder

    run, _, _ = tiny_qlora_run
    out, _ = tiny_merged
    cfg, rows, _ = reference
    adapter, tokenizer = load_model(open_folder(run))
    merged, _ = load_model(open_folder(out))
    folder = open_folder(run)
    prompts = [encode_prompt(tokenizer, folder.template.format(f"질문 {i}: 하늘은 왜 파란가요?")) for i in range(4)]
    sampling = Sampling(max_new_tokens=16)
    stops = stop_ids(tokenizer)
    from_adapter = generate(adapter, prompts, pad_id(tokenizer), stops, sampling)
    from_merged = generate(merged, prompts, pad_id(tokenizer), stops, sampling)
    assert [g.ids for g in from_adapter] == [g.ids for g in from_merged]
    assert all(len(g.ids) > 0 for g in from_adapter)


@pytest.mark.parametrize("which", ["run", "merged"])
def test_generation_config_stops_at_eos_and_end_of_turn(which, tiny_qlora_run, tiny_merged, llama3_tokenizer):
    """Both folders stop at the EOS training appended and at the base template's end of turn, although the run's
    tokenizer now carries the trained prompt's template."""
    from transformers import GenerationConfig

    out = tiny_qlora_run[0] if which == "run" else tiny_merged[0]
    config = GenerationConfig.from_pretrained(out)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    assert llama3_tokenizer.convert_tokens_to_ids("<|end_of_text|>") in eos  # the EOS training appended
    assert llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>") in eos  # the chat template's end of turn
    if which == "run":
        return
    assert config.pad_token_id is not None
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert {"kotune_template.yaml", "kotune_config.yaml", "merge_report.json"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    for record in ("merge_report.json", "run_summary.json"):  # records a user may share name no local folder
        text = (out / record).read_text(encoding="utf-8")
        assert str(tiny_qlora_run[0].parent) not in text and str(out.parent) not in text, record


@pytest.mark.slow
def test_original_target_drift_is_refused_unless_allowed(tiny_qlora_run, tmp_path, capsys):
    run, _, _ = tiny_qlora_run
    out = tmp_path / "original"
    with pytest.raises(merging.MergeError, match="drifts from the adapter beyond the threshold"):
        merging.merge(run, out, into="original", dtype="fp32")
    assert not out.exists()
    assert not any(tmp_path.iterdir()), "a refused merge leaves nothing behind"
    merging.merge(run, out, into="original", dtype="fp32", allow_drift=True)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["into"] == "original" and report["allow_drift"] is True
    assert report["targets"]["original"]["within_threshold"] is False
    assert report["targets"]["original"]["top1_agreement"] < drifting.MIN_TOP1_AGREEMENT
    assert "merge check, original (chosen)" in capsys.readouterr().out


@pytest.mark.slow
def test_merge_is_idempotent_and_refuses_to_overwrite(tiny_qlora_run, tiny_merged, tmp_path, capsys):
    run, _, _ = tiny_qlora_run
    out, _ = tiny_merged
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    merging.merge(run, out, dtype="fp32")
    assert "already holds this merge" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(merging.MergeError, match="--force"):
        merging.merge(run, out, dtype="bf16")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    merging.merge(run, copy, dtype="fp32", force=True)  # redone from scratch: the same bytes come out
    for name in ("model.safetensors", "merge_report.json", "config.json", "generation_config.json"):
        assert (copy / name).read_bytes() == (out / name).read_bytes(), name


def test_sharded_save_loads_with_plain_transformers(tiny_merged, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kotune.run_folder import open_folder

    out, _ = tiny_merged
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    sharded = tmp_path / "sharded"
    merging.save_merged(model, AutoTokenizer.from_pretrained(out), open_folder(out), sharded, shard_size="10MB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    ids = torch.tensor([[128000, 1234, 5678, 91011]])
    reloaded = AutoModelForCausalLM.from_pretrained(sharded).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_merge_refuses_merged_folder_and_non_runs(tiny_merged, tmp_path):
    from kotune.run_folder import FolderError

    out, _ = tiny_merged
    with pytest.raises(merging.MergeError, match="already a merged model"):
        merging.merge(out, tmp_path / "x")
    with pytest.raises(FolderError, match="neither adapter_config.json"):
        merging.merge(tmp_path, tmp_path / "x")


# -- what --out and --force may replace -------------------------------------------------------------
def marked_merge(folder: Path, source: dict) -> Path:
    """A folder laid out as kotune merge leaves it: weights, report with ``source``, the marker listing them."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    merging.write_report(folder, {"source": source})
    merging.write_marker(folder)
    return folder


def test_out_may_be_new_or_empty_and_force_replaces_only_a_marked_merge(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert merging.check_output(tmp_path / "new", run, {"a": 1}, force=False) is False
    (tmp_path / "empty").mkdir()
    assert merging.check_output(tmp_path / "empty", run, {"a": 1}, force=False) is False
    out = marked_merge(tmp_path / "merged", {"a": 1})
    assert merging.check_output(out, run, {"a": 1}, force=False) is True  # already this merge
    with pytest.raises(merging.MergeError, match="different kotune merge; pass --force"):
        merging.check_output(out, run, {"a": 2}, force=False)
    assert merging.check_output(out, run, {"a": 2}, force=True) is False


@pytest.mark.parametrize("case", ["user files", "a merge plus a user file", "a merge holding a folder", "a file"])
def test_force_never_replaces_what_kotune_did_not_write(case, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    out = tmp_path / "out"
    if case == "user files":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "a file":
        out.write_text("mine")
    else:
        marked_merge(out, {"a": 1})
        if case == "a merge holding a folder":
            (out / "other_run").mkdir()
        else:
            (out / "notes.txt").write_text("mine")
    with pytest.raises(merging.MergeError, match="kotune will not replace it") as refused:
        merging.check_output(out, run, {"a": 2}, force=True)
    assert "--force" not in str(refused.value), "--force would not be allowed, so it is not suggested"


def test_merge_force_refuses_the_run_and_a_folder_holding_it(tiny_qlora_run, tmp_path):
    """`kotune merge proj/run --out proj --force` once deleted proj/run and proj/other_run."""
    from kotune.cli import main

    run, _, _ = tiny_qlora_run
    proj = tmp_path / "proj"
    shutil.copytree(run, proj / "run")
    (proj / "other_run").mkdir()
    before = sorted(str(p.relative_to(proj)) for p in proj.rglob("*"))
    for out in (proj, proj / "run", proj / "run" / ".." / "run"):
        with pytest.raises(merging.MergeError, match="the run being merged or a folder holding it") as refused:
            merging.merge(proj / "run", out, force=True)
        assert "--force" not in str(refused.value)
    assert main(["merge", str(proj / "run"), "--out", str(proj), "--force"]) == 2
    assert sorted(str(p.relative_to(proj)) for p in proj.rglob("*")) == before


@pytest.mark.slow
def test_force_replaces_a_different_merge_atomically(tiny_qlora_run, tiny_merged, tmp_path):
    run, _, _ = tiny_qlora_run
    out, _ = tiny_merged
    old = marked_merge(tmp_path / "merged", {"an": "older merge"})
    merging.merge(run, old, dtype="fp32", force=True)
    assert (old / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    marker = json.loads((old / run_folder.MERGE_MARKER).read_text())
    assert set(marker["files"]) | {run_folder.MERGE_MARKER} == {p.name for p in old.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["merged"], "no partial or replaced folder is left beside it"


@pytest.mark.parametrize("which", ["run", "merged"])
def test_folder_tokenizers_prompt_in_the_trained_format(which, tiny_qlora_run, tiny_merged):
    """The run's and the merged folder's chat template is the run's ko-alpaca prompt, not the base's:
    apply_chat_template gives the ids kotune's training encoding gives the prompt, with and without input."""
    from transformers import AutoTokenizer

    from kotune.inference.generate import encode_prompt
    from kotune.run_folder import open_folder

    out = tiny_qlora_run[0] if which == "run" else tiny_merged[0]
    folder, tokenizer = open_folder(out), AutoTokenizer.from_pretrained(out)
    for instruction, given in (("하늘은 왜 파란가요?", None), ("요약하세요", '"따옴표"로 시작')):
        message = {"role": "user", "content": instruction, **({"input": given} if given else {})}
        ids = tokenizer.apply_chat_template([message], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        assert ids == encode_prompt(tokenizer, folder.template.format(instruction, given))


@pytest.mark.slow
def test_merge_works_from_any_working_directory(tiny_train_config, tmp_path):
    """A run trained on a relative data path once merged only from the folder training ran in."""
    from conftest import TINY_TRAIN_ROWS, run_kotune, write_jsonl

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "data").mkdir(parents=True)
    elsewhere.mkdir()
    write_jsonl(project / "data" / "train.jsonl", TINY_TRAIN_ROWS)
    overrides = {"data.path": "data/train.jsonl", "train.max_steps": 1, "train.gradient_accumulation_steps": 1}
    config = tiny_train_config("runs/one", overrides)
    (project / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    env = {"KOTUNE_CACHE": str(tmp_path / "cache")}
    trained = run_kotune(["train", "config.yaml"], env, cwd=project)
    assert trained.returncode == 0, trained.stderr[-3000:]
    merged = run_kotune(["merge", str(project / "runs" / "one"), "--dtype", "fp32"], env, cwd=elsewhere)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert (project / "runs" / "one" / "merged" / "model.safetensors").is_file()
