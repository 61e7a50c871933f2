"""Presets, offline: every shipped preset loads and states its facts; its stop tokens are what its published chat
template closes an assistant turn with (where that template is in ``chat_templates/``); ``kotune plan --preset``
says for each whether its recipe fits a 24 GiB and an 80 GiB card, as the preset claims; ``kotune init`` writes a
config that loads as the preset's recipe; and a non-commercial base is said at train, in the card and at push."""

from __future__ import annotations

from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kotune.cli import main
from kotune.config_load import load_config
from kotune.plan.estimate import memory_parts
from kotune.plan.gate import plan_preset
from kotune.plan.gpus import gpu_named
from kotune.plan.shape import shape_of
from kotune.presets import UnknownPreset, preset_for_model, preset_named, presets

TEMPLATES = Path(__file__).parent / "chat_templates"
PUBLISHED = {"qwen3-8b": "qwen3", "gemma-3-12b-it": "gemma3", "llama-3.1-8b-instruct": "llama3_1"}
"""Preset -> the published chat template (``chat_templates/NAME.jinja``) its stop tokens are checked against."""
BRIEF = (
    "beomi/Llama-3-Open-Ko-8B", "meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen3-8B", "LGAI-EXAONE/EXAONE-4.0-1.2B",
    "LGAI-EXAONE/EXAONE-4.0-32B", "kakaocorp/kanana-1.5-8b-instruct-2505",
    "naver-hyperclovax/HyperCLOVAX-SEED-Text-Instruct-1.5B", "skt/A.X-4.0-Light",
    "K-intelligence/Midm-2.0-Base-Instruct", "K-intelligence/Midm-2.0-Mini-Instruct", "google/gemma-3-12b-it",
)  # fmt: skip
CARDS = ("RTX4090", "H100-80GB")
"""A 24 GiB card and an 80 GiB card: every preset says whether its recipe fits each."""


def test_the_bases_people_fine_tune_have_presets_that_load():
    assert sorted(p.hub_id for p in presets().values()) == sorted(BRIEF)
    for p in presets().values():
        cfg = p.config()  # a checked Config: unknown keys or bad values fail here
        assert cfg.model.path == p.hub_id and preset_for_model(p.hub_id) is p
        assert p.stop_tokens and p.commercial_use in (True, False, None) and p.license and p.license_name
        assert set(p.checked) == {"shape", "template", "license"}, p.name
        assert tuple(p.fits) == CARDS, p.name
    with pytest.raises(UnknownPreset, match="qwen3-8b"):
        preset_named("qwen9")


def assistant_turn_end(template: str) -> str:
    """The text a chat template writes right after an assistant message's content, up to the line's end."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise ValueError(message)

    env.globals["raise_exception"] = raise_exception
    messages = [{"role": "user", "content": "USER-TEXT"}, {"role": "assistant", "content": "ASSISTANT-TEXT"}]
    text = env.from_string(template).render(messages=messages, add_generation_prompt=False, bos_token="<BOS>")
    return text.split("ASSISTANT-TEXT", 1)[1].split("\n", 1)[0]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_stop_tokens_are_what_the_published_template_closes_a_turn_with(name):
    preset = preset_named(name)
    template = (TEMPLATES / f"{PUBLISHED[name]}.jinja").read_text(encoding="utf-8")
    assert assistant_turn_end(template) == "".join(preset.stop_tokens)
    assert f"chat_templates/{PUBLISHED[name]}.jinja" in preset.checked["template"]


def test_the_turn_end_finder_tells_the_templates_apart():
    ends = {name: assistant_turn_end((TEMPLATES / f"{name}.jinja").read_text()) for name in PUBLISHED.values()}
    assert ends == {"qwen3": "<|im_end|>", "gemma3": "<end_of_turn>", "llama3_1": "<|eot_id|>"}


def test_a_preset_whose_template_was_not_read_says_so():
    for p in presets().values():
        if p.name not in PUBLISHED:
            assert "not verified" in p.checked["template"] or "not applicable" in p.checked["template"], p.name


@pytest.mark.parametrize("name", sorted(presets()))
def test_plan_says_whether_each_recipe_fits_a_24_and_an_80_gib_card_as_the_preset_claims(name):
    preset = preset_named(name)
    cfg = preset.config()
    for card, claimed in preset.fits.items():
        plan = plan_preset(preset, cfg, gpu_named(card))
        assert plan.fits is claimed, f"{name} on {card}: peak {plan.peak_bytes / 2**30:.1f} GiB"
        assert plan.longest.tokens == cfg.train.micro_batch_size * cfg.data.cutoff_len


def test_the_32b_recipe_fits_24_gib_only_on_the_fast_path(capsys):
    assert preset_named("exaone-4.0-32b").fits == {"RTX4090": True, "H100-80GB": True}
    assert main(["plan", "--preset", "exaone-4.0-32b"]) == 0
    out = capsys.readouterr().out
    assert out.count("predicted peak") == 2 and "DOES NOT FIT" not in out and "48 of 64 layers attend within" in out
    # overrides apply to the recipe: the plain path does not fit the 24 GiB card, a quarter of the pass does
    assert main(["plan", "--preset", "exaone-4.0-32b", "train.kernels=off", "--gpu", "RTX4090"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert (
        main(["plan", "--preset", "exaone-4.0-32b", "train.kernels=off", "data.cutoff_len=1024", "--gpu", "RTX4090"])
        == 0
    )
    assert "longest pass: step 1, 1 row(s), 1,024 tokens" in capsys.readouterr().out
    assert main(["plan", "--preset", "exaone-4.0-32b", "--fit"]) == 2  # refused by name, not ignored
    assert "drop --fit" in capsys.readouterr().err


def test_family_shapes_count_what_differs():
    gemma = shape_of(preset_named("gemma-3-12b-it").model_config())
    assert gemma.linear()["q_proj"] == (3840, 16 * 256) and gemma.linear()["o_proj"] == (4096, 3840)
    assert gemma.norm_params() == 48 * (4 * 3840 + 2 * 256) + 3840  # four norms a layer, q and k norms
    assert (gemma.sliding_layers, gemma.window, gemma.tied_embeddings) == (40, 1024, True)
    qwen3 = shape_of(preset_named("qwen3-8b").model_config())
    assert qwen3.norm_params() == 36 * (2 * 4096 + 2 * 128) + 4096 and qwen3.sliding_layers == 0
    llama = shape_of(preset_named("llama-3.1-8b-instruct").model_config())
    assert llama.norm_params() == 65 * 4096 and not llama.qk_norm
    cfg = preset_named("gemma-3-12b-it").config()
    plain = memory_parts(gemma, cfg, 2048, fast=False)
    # tied: one embedding table on the GPU, which is also the output layer
    assert plain["unquantized weights (lm_head, embeddings on GPU, norms)"] == (262208 * 3840 + gemma.norm_params()) * 2
    logits = plain["logits (bf16, fp32 copy, gradient)"]
    assert logits == 2048 * 262208 * 10 and logits > plain["activations (longest pass, 2,048 tokens)"]


def test_init_writes_the_recipe_and_lists_the_presets(tmp_path, capsys):
    assert main(["init", "--list"]) == 0
    listing = capsys.readouterr().out
    for p in presets().values():
        assert p.name in listing and p.hub_id in listing
    assert "EXAONE AI Model License Agreement 1.2 - NC  no (non-commercial)" in listing
    assert main(["init", "--preset", "qwen3-8b", str(tmp_path)]) == 0
    written = tmp_path / "qwen3-8b.yaml"
    assert load_config(written) == preset_named("qwen3-8b").config()
    text = written.read_text()
    assert "# licence: Apache License 2.0; commercial use: yes" in text and "stop tokens: <|im_end|>" in text
    assert main(["init", "--preset", "qwen3-8b", str(tmp_path)]) == 2  # never overwrites
    assert "does not overwrite" in capsys.readouterr().err


def test_a_non_commercial_base_is_said_in_the_card(tmp_path):
    from kotune.data.templates import KO_ALPACA
    from kotune.export.card import card_metadata, model_card
    from kotune.run_folder import ModelFolder

    exaone = load_config(None, ["model.path=LGAI-EXAONE/EXAONE-4.0-1.2B"])
    folder = ModelFolder(tmp_path, False, exaone, KO_ALPACA, "alpaca")
    meta = card_metadata(folder)
    assert meta["license"] == "other" and meta["license_name"] == "exaone-ai-model-license-agreement-1.2-nc"
    card = model_card(folder, "me/model")
    assert "**Non-commercial.**" in card and "EXAONE AI Model License Agreement 1.2 - NC" in card
    qwen = ModelFolder(tmp_path, False, load_config(None, ["model.path=Qwen/Qwen3-8B"]), KO_ALPACA, "alpaca")
    assert card_metadata(qwen)["license"] == "apache-2.0" and "## License" not in model_card(qwen, "me/model")


def test_a_base_card_with_a_non_commercial_licence_counts_too(tmp_path):
    from kotune.model.licence import base_licence, non_commercial_notice

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# a model\n")
    assert base_licence(str(base)).commercial_use is False
    assert "non-commercial use only" in non_commercial_notice(str(base))
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    assert non_commercial_notice(str(base)) is None
    assert non_commercial_notice("Qwen/Qwen3-8B") is None  # a preset's licence, nothing read from the hub


def test_push_without_private_warns_for_a_non_commercial_base(tmp_path, monkeypatch, capsys):
    from kotune.data.templates import KO_ALPACA
    from kotune.export import publish
    from kotune.run_folder import ModelFolder

    folder = ModelFolder(tmp_path, False, load_config(None, ["model.path=LGAI-EXAONE/EXAONE-4.0-32B"]), KO_ALPACA,
                         "alpaca")  # fmt: skip
    monkeypatch.setattr(publish, "open_folder", lambda path: folder)
    monkeypatch.setattr(publish, "upload_plan", lambda folder, repo: {"README.md": b"card"})
    publish.push(tmp_path, "me/model", private=False, dry_run=tmp_path / "public")
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "without --private" in warning[0] and "non-commercial" in warning[0]
    publish.push(tmp_path, "me/model", private=True, dry_run=tmp_path / "private")
    assert "warning" not in capsys.readouterr().err


def test_train_says_a_non_commercial_base_first(tmp_path, monkeypatch, capsys):
    from kotune.training import recipe

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(recipe, "resolve_model", lambda path: str(tmp_path))
    monkeypatch.setattr(recipe, "check_model_folder", lambda path: None)
    monkeypatch.setattr(recipe, "load_tokenizer", stop)  # the step after the notice: the run ends here
    cfg = load_config(None, ["model.path=LGAI-EXAONE/EXAONE-4.0-32B"])
    with pytest.raises(Stop):
        recipe._train(cfg, tmp_path, None, False, False)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "EXAONE AI Model License Agreement 1.2 - NC" in err[0] and "non-commercial" in err[0]
