"""Config: a YAML file and key=value overrides resolve to typed values, the result round-trips through YAML, and
every mistake a user can make is an error that names the key (and the file or the command line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kotune.config import Config, ConfigError
from kotune.config_load import load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_file_values_are_typed_and_overrides_win(tmp_path):
    path = write(
        tmp_path,
        "model:\n  quantization: none\ndata:\n  cutoff_len: 512\n  columns: {instruction: q, output: a}\n"
        "train:\n  learning_rate: 1e-4\n  max_steps: 30\n  report_to: []\n",
    )
    cfg = load_config(path, ["train.max_steps=7", "lora.target_modules=[q_proj, v_proj]", "data.max_rows=null"])
    assert cfg.model.quantization == "none" and cfg.data.cutoff_len == 512
    assert cfg.data.columns == {"instruction": "q", "output": "a"}
    assert cfg.train.learning_rate == 1e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.max_steps == 7  # the command line overrides the file
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.data.max_rows is None
    assert cfg.model.compute_dtype == Config().model.compute_dtype  # untouched keys keep their default


def test_comma_lists_and_keywords_on_the_command_line():
    cfg = load_config(None, ["lora.target_modules=q_proj,k_proj", "lora.trainable_tokens=auto"])
    assert cfg.lora.target_modules == ["q_proj", "k_proj"] and cfg.lora.trainable_tokens == "auto"
    assert load_config(None, ["lora.target_modules=all-linear"]).lora.target_modules == "all-linear"


def test_the_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["train.learning_rate=3e-4", "data.template=alpaca", "train.report_to=[]"])
    assert load_config(write(tmp_path, cfg.to_yaml())) == cfg


def test_effective_batch_is_derived_on_the_config():
    cfg = load_config(None, ["train.micro_batch_size=3", "train.gradient_accumulation_steps=5"])
    assert cfg.effective_batch_size() == 15 and cfg.effective_batch_size(world_size=4) == 15 * 4


@pytest.mark.parametrize("preset", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_preset_loads(preset):
    assert isinstance(load_config(preset), Config)


def test_misspelled_key_in_a_file_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, "train:\n  learning_rat: 1e-4\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"{path}: unknown key 'train.learning_rat'; did you mean 'train.learning_rate'?"


def test_key_in_the_wrong_section_is_pointed_to_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown key 'data.learning_rate'; did you mean 'train.learning_rate'"):
        load_config(None, ["data.learning_rate=1e-4"])


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trian'"):
        load_config(write(tmp_path, "trian:\n  max_steps: 3\n"))


@pytest.mark.parametrize(
    ("override", "what"),
    [
        ("train.max_steps=many", "must be a number, got 'many'"),
        ("train.max_steps=2.5", "must be a whole number, got 2.5"),
        ("model.double_quant=maybe", "must be true or false, got 'maybe'"),
        ("data.columns=[a]", "must be a mapping, got ['a']"),
        ("data.cutoff_len=null", "cannot be null"),
        ("model.quantization=2bit", "'2bit'; choose one of 4bit, 8bit, none"),
        ("train.optimizer=sgd", "'sgd'; choose one of paged_adamw_8bit, adamw_8bit, adamw_fused, adamw_torch"),
        ("data.cutoff_len=0", "must be positive, got 0"),
        ("train.gradient_accumulation_steps=-1", "must be positive, got -1"),
        ("data.val_size=1", "must be in [0, 1), got 1.0"),
        ("lora.dropout=1.5", "must be in [0, 1), got 1.5"),
        ("train.learning_rate=0", "must be positive, got 0.0"),
        ("train.max_steps=0", "must be positive (or null to train num_epochs), got 0"),
        ("train.report_to=[wandbb]", "'wandbb'; choose from wandb, tensorboard"),
    ],
)
def test_bad_values_are_errors_that_name_the_key(override, what):
    """The message names the key in quotes and says what is wrong with the value (wording around may change)."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    message = str(error.value)
    assert f"'{key}'" in message and what in message, message


def test_an_override_without_a_value_is_named():
    with pytest.raises(ConfigError, match=r"override 'train.max_steps' must look like section.key=value"):
        load_config(None, ["train.max_steps"])


def test_file_problems_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"absent\.yaml: config file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match=r"config\.yaml: section 'train' must be a mapping"):
        load_config(write(tmp_path, "train: 3\n"))
    with pytest.raises(ConfigError, match=r"config\.yaml: the top level must be a mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match=r"config\.yaml: not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))
