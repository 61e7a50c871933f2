"""kotune generate: prompts from any format, output equal to in-process greedy generation, resume after a kill
without duplicated rows, and the demo fine-tune stopping with EOS (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_kotune, write_jsonl

from kotune.commands.generate import check_resumable, completed_rows, prompt_format, prompt_hash
from kotune.data.read import DataError


# -- resume bookkeeping -----------------------------------------------------------------------------
def test_completed_rows_cuts_a_torn_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"row": 0, "generated": "a"}\n{"row": 2, "generated": "b"}\n{"row": 1, "genera')
    assert completed_rows(out) == {0: {"row": 0, "generated": "a"}, 2: {"row": 2, "generated": "b"}}
    assert out.read_bytes() == b'{"row": 0, "generated": "a"}\n{"row": 2, "generated": "b"}\n'
    assert completed_rows(tmp_path / "missing.jsonl") == {}


def test_completed_rows_refuses_a_foreign_file(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"row": 0}\nnot json\n{"row": 1}\n')
    with pytest.raises(DataError, match="line 2"):
        completed_rows(out)


def test_prompt_format_needs_only_the_prompt_side():
    assert prompt_format([{"instruction": "a"}, {"instruction": "b", "input": "c"}], "f") == "alpaca"
    assert prompt_format([{"prompt": "a"}], "f") == "prompt_completion"
    assert prompt_format([{"messages": []}], "f") == "messages"
    with pytest.raises(DataError, match="instruction, prompt, messages, conversations"):
        prompt_format([{"instruction": "a"}, {"prompt": "b"}], "f")


def test_a_run_folder_opens_without_its_training_data(tiny_qlora_run, tmp_path):
    """The saved config names the format detected at training time (the run asked for auto), so a run copied
    to another machine, without its data file, still opens."""
    import shutil

    from kotune.config_load import load_config
    from kotune.run_folder import CONFIG, open_folder

    run = tiny_qlora_run[0]
    saved = load_config(run / CONFIG)
    assert saved.data.format == "alpaca"
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    config = moved / CONFIG
    config.write_text(config.read_text().replace(saved.data.path, str(tmp_path / "gone.jsonl")))
    assert open_folder(moved).fmt == "alpaca"


def test_a_chat_template_file_is_left_to_the_saved_tokenizer(tmp_path):

    from kotune.config_load import load_config
    from kotune.training.recipe import saved_config

    jinja = tmp_path / "chat.jinja"
    jinja.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    cfg = load_config(None, [f"data.chat_template={jinja}"])
    saved = saved_config(cfg, "messages", jinja.read_text())
    assert (saved.data.format, saved.data.chat_template) == ("messages", None)
    cfg = load_config(None, ["data.chat_template=plain"])
    saved = saved_config(cfg, "sharegpt", "...")
    assert (saved.data.format, saved.data.chat_template) == ("sharegpt", "plain")
    assert saved_config(load_config(None, []), "alpaca", None).data.format == "alpaca"


def test_conversation_prompts_use_the_chat_template(tiny_qlora_run, tmp_path, llama3_tokenizer):
    from kotune.commands.generate import read_prompts
    from kotune.run_folder import open_folder

    messages = [{"role": "user", "content": "안녕?"}, {"role": "assistant", "content": "네."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    [(row, prompt)] = read_prompts(str(path), open_folder(tiny_qlora_run[0]), llama3_tokenizer)
    assert row["_row"] == 0
    assert prompt == llama3_tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)


# -- the command ------------------------------------------------------------------------------------
ROWS = [{"instruction": f"질문 {i}: 하늘은 왜 파란가요?", "input": "과학" if i % 3 == 0 else ""} for i in range(12)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def reference_output(tiny_qlora_run, tmp_path_factory):
    """An uninterrupted ``kotune generate`` over ROWS (adapter on the 4-bit base, greedy, 8 new tokens)."""
    run, cache, _ = tiny_qlora_run
    folder = tmp_path_factory.mktemp("generate")
    prompts = write_jsonl(folder / "prompts.jsonl", ROWS)
    out = folder / "out.jsonl"
    args = ["generate", str(run), "--input", str(prompts), "--output", str(out), "--max-new-tokens", "8"]
    result = run_kotune([*args, "--batch-size", "5"], {"KOTUNE_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    return prompts, out, args


def test_generate_writes_the_models_greedy_replies(tiny_qlora_run, reference_output):
    from kotune.inference.generate import Sampling, completion_text, encode_prompt, generate, pad_id
    from kotune.inference.load import load_model
    from kotune.run_folder import folder_stop_ids, open_folder

    _, out, _ = reference_output
    rows = read_jsonl(out)
    assert [r["row"] for r in rows] == list(range(len(ROWS)))
    assert all(r["instruction"] == ROWS[r["row"]]["instruction"] for r in rows)
    assert {r["finish"] for r in rows} <= {"stop", "length"}
    folder = open_folder(tiny_qlora_run[0])
    model, tokenizer = load_model(folder)
    prompts = [encode_prompt(tokenizer, folder.template.format(r["instruction"], r["input"])) for r in ROWS]
    stops = folder_stop_ids(folder, tokenizer, model)
    expected = generate(model, prompts, pad_id(tokenizer), stops, Sampling(max_new_tokens=8))
    assert [r["generated"] for r in rows] == [completion_text(tokenizer, g.ids) for g in expected]
    assert [r["finish"] == "stop" for r in rows] == [g.stopped for g in expected]


@pytest.mark.slow
def test_generate_resumes_after_a_kill_without_duplicating_rows(tiny_qlora_run, reference_output, tmp_path):
    _, cache, _ = tiny_qlora_run
    prompts, reference, args = reference_output
    out = tmp_path / "out.jsonl"
    args = [a if a != str(reference) else str(out) for a in args]
    env = {**os.environ, "KOTUNE_CACHE": str(cache)}
    command = [sys.executable, "-m", "kotune.cli", *args, "--batch-size", "1"]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if out.is_file() and out.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.02)
    assert process.poll() is None, "generate finished before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = out.read_bytes().count(b"\n")
    assert 3 <= written < len(ROWS)
    with out.open("ab") as f:  # what a kill in the middle of a write leaves
        f.write(b'{"row": 11, "instruction": "\xec\xa7\x88')

    result = run_kotune([*args, "--batch-size", "4"], {"KOTUNE_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{written} rows already in" in result.stdout
    rows = read_jsonl(out)
    assert sorted(r["row"] for r in rows) == list(range(len(ROWS)))  # each row once
    assert sorted(rows, key=lambda r: r["row"]) == read_jsonl(reference)

    again = run_kotune(args, {"KOTUNE_CACHE": str(cache)})
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert read_jsonl(out) == rows


def test_resume_checks_each_rows_prompt_and_the_model(tmp_path):
    prompts = [({"_row": 0}, "prompt a"), ({"_row": 1}, "prompt b")]
    done = {0: {"row": 0, "prompt_sha256": prompt_hash("prompt a"), "model": "adapter:1"}}
    check_resumable(tmp_path / "out.jsonl", done, prompts, "adapter:1")
    with pytest.raises(DataError, match="row 0 was generated by another model"):
        check_resumable(tmp_path / "out.jsonl", done, prompts, "adapter:2")
    with pytest.raises(DataError, match="row 0 was generated for another prompt"):
        check_resumable(tmp_path / "out.jsonl", done, [({"_row": 0}, "prompt b")], "adapter:1")
    with pytest.raises(DataError, match="another prompt"):  # a row the input no longer has
        check_resumable(tmp_path / "out.jsonl", {5: {**done[0], "row": 5}}, prompts, "adapter:1")


def test_resume_refuses_other_sampling_settings(tmp_path):
    """Greedy rows and rows sampled at temperature 0.7, or cut at other lengths, must not mix in one file."""
    from kotune.commands.generate import recorded_sampling
    from kotune.inference.generate import Sampling

    greedy = recorded_sampling(Sampling(), seed=3)
    assert "seed" not in greedy  # greedy replies do not depend on it
    prompts = [({"_row": 0}, "prompt a"), ({"_row": 1}, "prompt b")]
    done = {0: {"row": 0, "prompt_sha256": prompt_hash("prompt a"), "model": "m", "sampling": greedy}}
    check_resumable(tmp_path / "out.jsonl", done, prompts, "m", recorded_sampling(Sampling(), seed=4))
    for other in (Sampling(temperature=0.7), Sampling(max_new_tokens=64)):
        with pytest.raises(DataError, match="row 0 was generated with other settings .*--temperature 0.0"):
            check_resumable(tmp_path / "out.jsonl", done, prompts, "m", recorded_sampling(other, seed=4))
    sampled = {0: {**done[0], "sampling": recorded_sampling(Sampling(temperature=0.7), seed=1)}}
    with pytest.raises(DataError, match="--seed 1"):
        check_resumable(tmp_path / "out.jsonl", sampled, prompts, "m", recorded_sampling(Sampling(temperature=0.7), 2))
    legacy = {0: {k: v for k, v in done[0].items() if k != "sampling"}}  # written before rows recorded them
    check_resumable(tmp_path / "out.jsonl", legacy, prompts, "m", greedy)


@pytest.mark.parametrize("change", ["other prompts", "reordered prompts", "another base quantization"])
def test_generate_refuses_to_complete_an_output_of_other_prompts_or_model(
    change, tiny_qlora_run, reference_output, tmp_path
):
    """An output written for other prompts or by another model was once reported as "all rows already there"."""
    _, cache, _ = tiny_qlora_run
    prompts, reference, args = reference_output
    out = tmp_path / "out.jsonl"
    out.write_bytes(reference.read_bytes())
    args = [a if a != str(reference) else str(out) for a in args]
    if change == "another base quantization":
        args += ["--base", "none"]
    else:
        rows = [{**r, "instruction": r["instruction"] + "?"} for r in ROWS] if change == "other prompts" else ROWS[::-1]
        args = [a if a != str(prompts) else str(write_jsonl(tmp_path / "other.jsonl", rows)) for a in args]
    result = run_kotune(args, {"KOTUNE_CACHE": str(cache)})
    assert result.returncode == 2, result.stdout + result.stderr[-3000:]
    expected = "another model or setting" if change == "another base quantization" else "for another prompt"
    assert expected in result.stderr and "give a new --output" in result.stderr
    assert out.read_bytes() == reference.read_bytes()


def test_the_saved_config_holds_absolute_local_data_paths(tmp_path, monkeypatch):
    """merge reads the run's data again, so it must find it from any working directory; hub names stay."""

    from kotune.config_load import load_config
    from kotune.training.recipe import saved_config

    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "data" / "val.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.path=data/train.jsonl", "data.validation_path=./data/val.jsonl"])
    saved = saved_config(cfg, "alpaca", None)
    assert saved.data.path == str(tmp_path.resolve() / "data" / "train.jsonl")
    assert saved.data.validation_path == str(tmp_path.resolve() / "data" / "val.jsonl")
    hub = saved_config(load_config(None, []), "alpaca", None)
    assert hub.data.path == load_config(None, []).data.path and hub.data.validation_path is None


def test_model_fingerprint_tells_adapter_base_quantization_and_merge_apart(tiny_qlora_run, tiny_merged, tmp_path):
    import shutil

    from kotune.inference.load import model_fingerprint
    from kotune.run_folder import open_folder

    run = open_folder(tiny_qlora_run[0])
    names = {model_fingerprint(run), model_fingerprint(run, "none"), model_fingerprint(open_folder(tiny_merged[0]))}
    assert len(names) == 3
    assert model_fingerprint(run, "4bit") == model_fingerprint(run)  # the quantization it trained with
    copy = tmp_path / "copy"
    shutil.copytree(tiny_qlora_run[0], copy, ignore=shutil.ignore_patterns("checkpoint-*", "best"))
    assert model_fingerprint(open_folder(copy)) == model_fingerprint(run)  # the weights, not the folder
    (copy / "adapter_model.safetensors").write_bytes(b"other weights")
    assert model_fingerprint(open_folder(copy)) != model_fingerprint(run)
