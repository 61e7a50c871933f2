"""``kotune eval``'s scorers on a tiny random model: loss / perplexity against transformers' own loss, multiple
choice against a real lm-evaluation-harness run, and ``train.eval_generate`` in a short training run."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from conftest import ROOT, write_jsonl

from kotune.data.examples import IGNORE, Example

CHOICE_SET = ROOT / "data" / "ko-choice-smoke.jsonl"


@pytest.fixture(scope="module")
def tiny(tiny_llama3_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama3_model, dtype="float32").eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama3_model)


@pytest.fixture(scope="module")
def folder(tiny_llama3_model, tmp_path_factory):
    """What ``open_folder`` gives for a run of the tiny model: its config and the ko-alpaca template."""
    from kotune.config_load import load_config
    from kotune.data.templates import load_template

    cfg = load_config(None, [f"model.path={tiny_llama3_model}", "data.cutoff_len=256"])
    return SimpleNamespace(path=tmp_path_factory.mktemp("folder"), config=cfg, template=load_template("ko-alpaca"))


def test_row_losses_equal_transformers_loss(tiny, folder, tmp_path):
    import torch

    from kotune.evaluation.heldout import load_heldout, overall_loss, row_losses

    model, tokenizer = tiny
    rows = [
        {"instruction": f"질문 {i}: 수도는?", "input": "" if i % 2 else "한국", "output": "서울" * (i + 1)}
        for i in range(5)
    ]
    heldout = load_heldout(folder, tokenizer, str(write_jsonl(tmp_path / "rows.jsonl", rows)))
    assert [e.row for e in heldout.examples] == list(range(5))
    ours = row_losses(model, heldout.examples, tokenizer.eos_token_id, batch_size=3)  # padded batches
    sums, counts = 0.0, 0
    for example, row in zip(heldout.examples, ours, strict=True):
        ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
        with torch.no_grad():
            reference = model(input_ids=ids, labels=labels).loss.item()  # mean over the shifted, unmasked labels
        n = sum(1 for t in example.labels[1:] if t != IGNORE)
        assert row["tokens"] == n
        assert row["loss"] == pytest.approx(reference, rel=1e-5)
        assert row["perplexity"] == pytest.approx(math.exp(reference), rel=1e-5)
        sums, counts = sums + reference * n, counts + n
    total = overall_loss(ours)
    assert total["tokens"] == counts
    assert total["loss"] == pytest.approx(sums / counts, rel=1e-5)


def test_heldout_default_is_the_runs_validation_split(tiny, folder, tmp_path):
    from dataclasses import replace

    from kotune.data.read import split_indices
    from kotune.evaluation.heldout import load_heldout

    rows = [{"instruction": f"질문 {i}", "input": "", "output": f"답 {i}"} for i in range(20)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = replace(folder.config, data=replace(folder.config.data, path=str(data), val_size=0.2))
    heldout = load_heldout(SimpleNamespace(**{**vars(folder), "config": cfg}), tiny[1], None)
    assert sorted(r["_row"] for r in heldout.rows) == sorted(split_indices(20, 0.2, cfg.data.seed)[1])


def test_choice_items_are_checked(tmp_path):
    from kotune.data.read import DataError
    from kotune.evaluation.choice import read_items

    items = read_items(CHOICE_SET)
    assert len(items) >= 200 and len({i["subject"] for i in items}) >= 6
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 1}\n{"question": "q", "choices": ["a"]}\n')
    with pytest.raises(DataError, match="line 2: missing 'answer'"):
        read_items(bad)
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": "c"}\n')
    with pytest.raises(DataError, match="line 1: 'answer'"):
        read_items(bad)


def local_task(folder, items) -> str:
    """An lm-eval task definition pointing at a local JSONL: the same prompt and choices kotune scores."""
    data = write_jsonl(folder / "items.jsonl", items)
    (folder / "ko_choice_local.yaml").write_text(
        "task: ko_choice_local\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "질문: {{question}}\\n정답:"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        encoding="utf-8",
    )
    return str(folder)


def test_choice_scores_equal_lm_eval(tiny, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from kotune.evaluation.choice import CONTEXT, DELIMITER, read_items, score_items
    from kotune.evaluation.harness import load_tasks, run_tasks

    model, tokenizer = tiny
    items = read_items(CHOICE_SET)[::12]  # every subject, 18 items
    summary, records = score_items(model, tokenizer, items)
    # the same (context, continuation) pairs through lm-eval's own log-likelihood
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    requests = [
        Instance("loglikelihood", {}, (CONTEXT.format(question=item["question"]), DELIMITER + choice), i)
        for i, item in enumerate(items)
        for choice in item["choices"]
    ]
    theirs = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    ours = [ll for record in records for ll in record["logprobs"]]
    assert ours == pytest.approx(theirs, abs=1e-4)
    # and a whole lm-eval run of a local task over the same items gives the same accuracies
    results = run_tasks(model, tokenizer, load_tasks(["ko_choice_local"], local_task(tmp_path, items)))
    assert results["ko_choice_local"]["acc"] == pytest.approx(summary["acc"])
    assert results["ko_choice_local"]["acc_norm"] == pytest.approx(summary["acc_norm"])


def test_harness_errors_say_what_to_do(monkeypatch):
    import builtins

    from kotune.evaluation.harness import HarnessError, load_tasks, require_lm_eval

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name.startswith("lm_eval"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(builtins, "__import__", no_lm_eval)
        with pytest.raises(HarnessError, match=r"kotune\[eval\]"):
            require_lm_eval()
    pytest.importorskip("lm_eval")
    with pytest.raises(HarnessError, match="unknown lm-eval task"):
        load_tasks(["no_such_task_kotune"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-kotune-hf-home")
    with pytest.raises(HarnessError, match="kobest_boolq: its data could not be loaded"):
        load_tasks(["kobest_boolq"])


def test_prompt_and_reference_cut_at_the_first_trained_token():
    from kotune.evaluation.checks import prompt_and_reference

    example = Example(0, [1, 10, 11, 12, 20, 21, 2], [IGNORE, IGNORE, IGNORE, IGNORE, 20, 21, 2])
    assert prompt_and_reference(example) == ([1, 10, 11, 12], [20, 21, 2])


def test_eval_generate_logs_generation_checks(tiny_train_config, tmp_path, monkeypatch):
    from kotune.training.recipe import train

    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))
    cfg = tiny_train_config(tmp_path / "run", {"train.eval_generate": 2, "train.max_steps": 3})
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert evals and all(0 <= r["gen_stop_rate"] <= 1 and 0 <= r["gen_loop_rate"] <= 1 for r in evals)
    assert all(r["gen_reply_tokens"] > 0 for r in evals)
    assert all("gen_stop_rate" not in r for r in records if "eval_loss" not in r)
