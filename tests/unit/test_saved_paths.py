"""A merged folder's ``kotune_config.yaml`` names no folder of this machine: its paths are saved relative to the
folder (or under ``~``) and read back absolute, so ``kotune eval`` still finds the held-out rows, also after the
project moved, and ``kotune push`` uploads only the files' names."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import write_jsonl

from kotune.config_load import load_config
from kotune.data.templates import load_template
from kotune.paths import portable_path, saved_path
from kotune.run_folder import CONFIG, open_folder, save_config_copy, save_template


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home folder holding a project (data, a run, its merge) and a base model outside the project."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    (home / "models" / "base").mkdir(parents=True)
    (home / "proj" / "runs" / "r1" / "merged").mkdir(parents=True)
    (home / "proj" / "data").mkdir()
    rows = [{"instruction": f"say {i}", "output": f"{i}"} for i in range(10)]
    write_jsonl(home / "proj" / "data" / "train.jsonl", rows)
    return home


def test_paths_are_saved_relative_to_the_folder_or_under_home(home):
    merged = home / "proj" / "runs" / "r1" / "merged"
    assert portable_path(str(home / "proj" / "data" / "train.jsonl"), merged) == "../../../data/train.jsonl"
    assert portable_path(str(home / "proj" / "runs" / "r1"), merged) == ".."
    assert portable_path(str(merged / "x.jsonl"), merged) == "./x.jsonl"
    assert portable_path(str(home / "models" / "base"), merged) == "~/models/base"  # shares only home
    assert portable_path("/opt/shared/base", merged) == "/opt/shared/base"  # shares only the root: kept
    for unchanged in ("beomi/Llama-3-Open-Ko-8B", "outputs/run", "pypi:pkg==1.0/model.gguf"):
        assert portable_path(unchanged, merged) == unchanged


def test_saved_paths_read_back_absolute(home, tmp_path, monkeypatch):
    merged = home / "proj" / "runs" / "r1" / "merged"
    assert saved_path("../../../data/train.jsonl", merged) == str(home / "proj" / "data" / "train.jsonl")
    assert saved_path("..", merged) == str(home / "proj" / "runs" / "r1")
    assert saved_path("~/models/base", merged) == str(home / "models" / "base")
    monkeypatch.chdir(tmp_path)  # not there from the folder: read from the working directory, as before
    assert saved_path("./data/old.jsonl", merged) == "./data/old.jsonl"
    assert saved_path("org/name", merged) == "org/name"


def merged_folder(home):
    """A merged folder as ``kotune merge`` leaves one, its config saved from a run's (absolute paths)."""
    project = home / "proj"
    values = {
        "model.path": str(home / "models" / "base"),
        "data.path": str(project / "data" / "train.jsonl"),
        "data.format": "alpaca",
        "data.val_size": 0.2,
        "train.output_dir": str(project / "runs" / "r1"),
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in values.items()])
    merged = project / "runs" / "r1" / "merged"
    save_config_copy(cfg, merged)
    save_template(load_template("alpaca"), merged)
    (merged / "config.json").write_text("{}", encoding="utf-8")
    return merged


def test_a_merged_folder_names_no_local_folder_and_opens_with_its_paths(home):
    merged = merged_folder(home)
    text = (merged / CONFIG).read_text(encoding="utf-8")
    assert str(home) not in text
    saved = yaml.safe_load(text)
    assert saved["data"]["path"] == "../../../data/train.jsonl" and saved["model"]["path"] == "~/models/base"
    cfg = open_folder(merged).config
    assert cfg.data.path == str(home / "proj" / "data" / "train.jsonl")
    assert cfg.model.path == str(home / "models" / "base")
    assert cfg.train.output_dir == str(home / "proj" / "runs" / "r1")


def test_eval_reads_the_held_out_rows_after_the_project_moved(home, mock_tokenizer):
    from kotune.evaluation.heldout import load_heldout

    merged_folder(home)
    shutil.move(home / "proj", home / "moved")  # data, run and merge move together
    folder = open_folder(home / "moved" / "runs" / "r1" / "merged")
    heldout = load_heldout(folder, mock_tokenizer, None)
    assert heldout.source == f"{home / 'moved' / 'data' / 'train.jsonl'} (validation split)"
    assert len(heldout.rows) == 2 and len(heldout.examples) == 2


def test_push_uploads_the_names_only(home):
    from kotune.export.publish import portable_copies

    uploaded = yaml.safe_load(portable_copies(open_folder(merged_folder(home)))[CONFIG])
    assert uploaded["data"]["path"] == "train.jsonl" and uploaded["model"]["path"] == "base"
    assert uploaded["train"]["output_dir"] == ".."  # names no folder
    assert str(home) not in json.dumps(uploaded) and "../" not in json.dumps(uploaded)
