"""Config: shipped presets load, defaults are the walkthrough's (with its mistakes fixed), bad keys are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from kotune.config import SECTIONS, Config, ConfigError, field_docs
from kotune.config_load import load_config
from kotune.docs import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "examples").glob("*.yaml"))


def test_there_are_presets():
    names = {p.name for p in PRESETS}
    assert {"ko-demo.yaml", "llama3-ko-8b.yaml"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_shipped_preset_loads(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)


def test_defaults_are_the_walkthrough_recipe_with_fixes():
    cfg = Config()
    assert (cfg.data.cutoff_len, cfg.data.val_size, cfg.data.train_on_inputs) == (4098, 0.005, False)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 16, 0.05)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    t = cfg.train
    assert (t.micro_batch_size, t.gradient_accumulation_steps, t.num_epochs, t.warmup_steps) == (1, 8, 1.0, 100)
    assert (t.optimizer, t.adam_beta1, t.adam_beta2, t.lr_scheduler) == ("paged_adamw_8bit", 0.9, 0.95, "cosine")
    assert (t.eval_steps, t.save_steps, t.load_best_model_at_end) == (50, 50, True)
    assert cfg.model.compute_dtype == "bfloat16" and cfg.model.quantization == "4bit" and cfg.model.double_quant
    assert t.learning_rate == 2e-4  # not the walkthrough's 5e-8
    assert cfg.effective_batch_size() == 8


def test_llama3_preset_is_the_walkthrough():
    cfg = load_config(ROOT / "examples" / "llama3-ko-8b.yaml")
    assert cfg.model.path == "beomi/Llama-3-Open-Ko-8B"
    assert cfg.data.path == "DopeorNope/Ko-Optimize_Dataset"
    assert cfg.data.template == "ko-alpaca"


def test_misspelled_key_in_file_is_named_with_the_closest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learnig_rate: 1e-4\n", encoding="utf-8")
    with pytest.raises(
        ConfigError,
        match=r"bad.yaml: unknown key 'train.learnig_rate'; did you mean 'train.learning_rate'",
    ):
        load_config(path)


def test_unknown_section_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lroa:\n  r: 8\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown key 'lroa'"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.learnig_rate=1", "did you mean 'train.learning_rate'"),
        ("learning_rate=1", "did you mean 'train.learning_rate'"),
        ("trian.seed=1", "did you mean 'train.seed'"),
        ("lora.r=abc", "'lora.r' must be a number"),
        ("lora.r=1.5", "must be a whole number"),
        ("train.optimizer=sgd", "choose one of"),
        ("data.val_size=1.5", "'data.val_size' must be in"),
        ("train.learning_rate", "must look like section.key=value"),
        ("train.max_steps=-3", "'train.max_steps' must be positive"),
        ("train.max_steps=0", "'train.max_steps' must be positive"),
        ("train.num_epochs=0", "'train.num_epochs' must be positive"),
        ("train.num_epochs=-1", "'train.num_epochs' must be positive"),
        ("train.report_to=[tensorbord]", "'train.report_to' holds 'tensorbord'; choose from wandb, tensorboard"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_overrides_parse_values_like_yaml():
    cfg = load_config(
        None,
        [
            "train.learning_rate=1e-4",
            "lora.target_modules=[q_proj, v_proj]",
            "data.train_on_inputs=true",
            "model.pad_token=null",
            "data.max_rows=7",
        ],
    )
    assert cfg.train.learning_rate == 1e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.train_on_inputs is True and cfg.model.pad_token is None and cfg.data.max_rows == 7
    assert load_config(None, ["lora.target_modules=all-linear"]).lora.target_modules == "all-linear"


def test_every_field_has_a_docstring():
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        missing = [f for f in cls.__dataclass_fields__ if not docs.get(f)]
        assert not missing, f"{section}: fields without a docstring: {missing}"


def test_readme_config_reference_is_generated_from_the_docstrings():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert reference_markdown() in readme, "README is stale: run `python -m kotune.docs` to regenerate it"


def test_dry_run_prints_the_resolved_config(capsys):
    from kotune.cli import main

    assert main(["train", str(ROOT / "examples" / "ko-demo.yaml"), "--dry-run", "train.learning_rate=3e-4"]) == 0
    out = capsys.readouterr().out
    assert "learning_rate: 0.0003" in out and "cutoff_len:" in out


def test_cli_reports_a_misspelled_key_without_traceback(capsys):
    from kotune.cli import main

    assert main(["train", str(ROOT / "examples" / "ko-demo.yaml"), "--dry-run", "lora.rank=8"]) == 2
    assert "unknown key 'lora.rank'" in capsys.readouterr().err


@pytest.mark.parametrize("logger", ["wandb", "tensorboard"])
def test_a_logger_whose_package_is_missing_names_the_extra_before_anything_loads(logger, monkeypatch, capsys):
    from kotune.cli import main
    from kotune.training import report

    monkeypatch.setitem(report.PACKAGES, logger, "kotune_no_such_package")
    config = str(ROOT / "examples" / "ko-demo.yaml")
    assert main(["train", config, "--dry-run", f"train.report_to=[{logger}]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kotune: error: ") and logger in err and "pip install 'kotune[logging]'" in err
    monkeypatch.setitem(report.PACKAGES, logger, "json")  # any installed package: the check passes
    assert main(["train", config, "--dry-run", f"train.report_to=[{logger}]"]) == 0
