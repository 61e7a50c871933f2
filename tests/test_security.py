"""Security: writes stay in the output folder, pickle is refused, remote code stays off, tokens are never saved."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from kotune.security import REDACTED, SecurityError, inside, redact, refuse_pickle
from kotune.training.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from kotune.training.recipe import train


def test_inside_accepts_paths_in_the_folder(tmp_path):
    assert inside(tmp_path, "checkpoint-2", "adapter_model.safetensors") == tmp_path / "checkpoint-2" / (
        "adapter_model.safetensors"
    )


def test_inside_refuses_dot_dot_and_absolute_paths(tmp_path):
    with pytest.raises(SecurityError, match="outside the output folder"):
        inside(tmp_path / "out", "..", "elsewhere")
    with pytest.raises(SecurityError, match="outside the output folder"):
        inside(tmp_path / "out", "/etc/passwd")


def test_inside_refuses_a_symlink_that_leaves_the_folder(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "best").symlink_to(elsewhere)
    with pytest.raises(SecurityError, match=r"best resolves to .*elsewhere, outside the output folder"):
        inside(out, "best")


def test_training_refuses_an_output_folder_with_a_link_leading_out(tiny_train_config, tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "metrics.jsonl").symlink_to(elsewhere / "stolen.jsonl")
    with pytest.raises(SecurityError, match=r"metrics.jsonl resolves to .*stolen.jsonl, outside the output folder"):
        train(tiny_train_config(out))
    assert list(elsewhere.iterdir()) == []


def test_a_checkpoint_save_does_not_follow_a_planted_symlink(tiny_train_config, tmp_path):
    from kotune.training.build import load_for_training
    from kotune.training.optim import build_optimizer

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "checkpoint-2").symlink_to(elsewhere)
    cfg = tiny_train_config(out)
    model = load_for_training(cfg, cfg.model.path).peft
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    with pytest.raises(SecurityError, match="checkpoint-2 resolves to"):
        write_checkpoint(out, 2, model, optimizer, {"step": 2})
    assert list(elsewhere.iterdir()) == []


def test_a_pickle_checkpoint_is_refused(tmp_path):
    # What a transformers Trainer checkpoint holds: loading these would unpickle.
    folder = tmp_path / "checkpoint-50"
    folder.mkdir()
    for name in ("optimizer.pt", "rng_state.pth", "training_args.bin", "adapter_model.safetensors"):
        (folder / name).write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match=r"pickle files \(optimizer.pt, rng_state.pth, training_args.bin\)"):
        read_checkpoint(folder)


def test_a_model_folder_with_only_pickle_weights_is_refused_unless_allowed(
    tiny_train_config, tiny_llama3_model, tmp_path
):
    folder = tmp_path / "pickled-model"
    shutil.copytree(tiny_llama3_model, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(SecurityError, match=r"pytorch_model.bin\) and no safetensors.*model.allow_pickle: true"):
        train(tiny_train_config(tmp_path / "out", {"model.path": str(folder)}))
    refuse_pickle(folder, allow=True, what="model folder", flag="model.allow_pickle: true")
    refuse_pickle(tiny_llama3_model, allow=False, what="model folder", flag="model.allow_pickle: true")


def test_load_base_refuses_a_model_folder_with_only_pickle_weights(tiny_llama3_model, tmp_path):
    """merge, chat, generate and eval load the base through ``load_base``: the same guard as training."""
    from kotune.config import ModelConfig
    from kotune.model.load import load_base

    folder = tmp_path / "pickled-model"
    shutil.copytree(tiny_llama3_model, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(SecurityError, match=r"pytorch_model.bin\) and no safetensors.*model.allow_pickle: true"):
        load_base(ModelConfig(path=str(folder), compute_dtype="float32"), "none")


def test_remote_code_does_not_run_unless_the_config_allows_it(tiny_llama3_model, tmp_path):
    from kotune.config import Config
    from kotune.training.build import load_for_training

    folder = tmp_path / "custom-code-model"
    shutil.copytree(tiny_llama3_model, folder)
    sentinel = tmp_path / "remote-code-ran"
    (folder / "modeling_custom.py").write_text(
        f"from pathlib import Path\nPath({str(sentinel)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    pass\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "modeling_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))
    cfg = Config()
    cfg.model.quantization, cfg.model.compute_dtype = "none", "float32"
    assert cfg.model.trust_remote_code is False
    load_for_training(cfg, str(folder))
    assert not sentinel.exists()
    cfg.model.trust_remote_code = True
    load_for_training(cfg, str(folder))
    assert sentinel.read_text() == "ran"  # the check above could see remote code run


def test_redact_hides_known_and_token_shaped_strings(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "my-secret-token-value")
    text = "run_name: my-secret-token-value\npath: hf_abcdefghijklmnopqrstuvwxyz0123\nlr: 0.0002\n"
    assert redact(text) == f"run_name: {REDACTED}\npath: {REDACTED}\nlr: 0.0002\n"


@pytest.mark.slow
def test_planted_tokens_appear_in_no_file_or_log_of_a_run(tiny_train_config, tmp_path):
    env_token = "kotune-planted-env-token-5d1e9c"  # not hf_-shaped: only knowing the env value can hide it
    login_token = "hf_PlantedLoginToken0123456789abcdef"
    hf_home = tmp_path / "hf-home"
    hf_home.mkdir()
    (hf_home / "token").write_text(login_token)  # where `huggingface-cli login` keeps it
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(tiny_train_config(out, {"train.max_steps": 4}).to_yaml())
    env = {**os.environ, "HF_TOKEN": env_token, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    # a user pasting both tokens into a free-text field of the config
    run = subprocess.run(
        [sys.executable, "-m", "kotune.cli", "train", str(config), f"train.run_name={env_token}+{login_token}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.relative_to(out).as_posix() for p in files}
    expected = {"kotune_config.yaml", "metrics.jsonl", "adapter_model.safetensors", "best/adapter_model.safetensors"}
    expected |= {f"checkpoint-2/{name}" for name in ("trainer_state.json", "fingerprint.json", "optimizer.safetensors")}
    assert expected <= names, "the scan must cover a run's real files"
    for token in (env_token, login_token):
        leaks = [p for p in files if token.encode() in p.read_bytes()]
        assert leaks == [], f"{token} written to {leaks}"
        assert token not in run.stdout and token not in run.stderr
    assert f"run_name: {REDACTED}+{REDACTED}" in (out / "kotune_config.yaml").read_text()
