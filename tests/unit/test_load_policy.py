"""One policy for every way a base is loaded: training (``load_base_model``), merge / chat / generate / eval
(``load_base``) and FSDP (``load_sharded``) refuse a folder whose files lack a weight with the same error and the
same message, and a folder of pickle weights unless ``model.allow_pickle``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kotune.config import Config, ModelConfig
from kotune.model.assets import AssetError
from kotune.model.load import MissingWeights, load_base, load_base_model
from kotune.model.sharded_load import load_sharded
from kotune.security import SecurityError

DROPPED = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def lacking_folder(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with one weight deleted from its safetensors file."""
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("lacking") / "model"))
    weights = load_file(folder / "model.safetensors")
    del weights[DROPPED]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def pickled_folder(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its weights as (fake) pickle and no safetensors."""
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("pickled") / "model"))
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    return folder


def plain(path: Path, **more) -> ModelConfig:
    return ModelConfig(path=str(path), quantization="none", compute_dtype="float32", **more)


def sharded(path: Path, **more):
    """``load_sharded`` on one process, nothing sharded (the checks come before any weight is read)."""
    cfg = Config()
    cfg.model = plain(path, **more)
    return load_sharded(str(path), cfg, lambda model: model, lambda layer: None)


def loaders(path: Path, **more) -> dict:
    return {
        "training": lambda: load_base_model(str(path), plain(path, **more)),
        "load_base": lambda: load_base(plain(path, **more), "none"),
        "sharded": lambda: sharded(path, **more),
    }


def test_every_loader_refuses_missing_weights_with_one_message(lacking_folder):
    messages = {}
    for name, load in loaders(lacking_folder).items():
        with pytest.raises(MissingWeights) as caught:
            load()
        messages[name] = str(caught.value)
    expected = f"model {lacking_folder}: 1 weights are missing from its files ({DROPPED}), so they would be random"
    assert all(m.startswith(expected) for m in messages.values()), messages
    assert len(set(messages.values())) == 1


def test_every_loader_refuses_pickle_weights_unless_allowed(pickled_folder):
    for load in loaders(pickled_folder).values():
        with pytest.raises(SecurityError, match=r"pytorch_model.bin\) and no safetensors.*model.allow_pickle: true"):
            load()
    with pytest.raises(AssetError, match="train.distributed fsdp reads safetensors only"):
        sharded(pickled_folder, allow_pickle=True)  # allowed, but FSDP reads safetensors files only


def test_the_cli_prints_missing_weights_as_one_error_line(lacking_folder, tmp_path, capsys):
    from kotune.cli import main
    from tests.unit.test_pinned_run import write_config

    config = write_config(tmp_path, str(lacking_folder))
    assert main(["train", str(config)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kotune: error: ")]
    assert len(lines) == 1 and f"kotune: error: model {lacking_folder}: 1 weights are missing" in lines[0]
    assert DROPPED in lines[0]
