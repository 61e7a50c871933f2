"""``kotune init --preset NAME [DIR]``: write a preset's recipe as a config to edit; ``kotune init --list``: the
presets, with their licences and whether those allow commercial use."""

from __future__ import annotations

from pathlib import Path

from kotune.config import ConfigError


def register(sub) -> None:
    p = sub.add_parser("init", help="write a ready config for a known base model (a preset); --list shows them")
    p.add_argument("dir", nargs="?", default=".", help="folder to write NAME.yaml into (default: here)")
    p.add_argument("--preset", metavar="NAME", help="the preset to write (see --list)")
    p.add_argument("--list", action="store_true", help="list the presets: hub id, architecture, licence")
    p.set_defaults(run=run)


def run(args) -> int:
    from kotune import output
    from kotune.presets import preset_named, presets

    if args.list:
        print("\n".join(listing(presets().values())))
        return 0
    if not args.preset:
        raise ConfigError("name a preset: kotune init --preset NAME [DIR] (kotune init --list shows them)")
    preset = preset_named(args.preset)
    target = Path(args.dir) / f"{preset.name}.yaml"
    if target.exists():
        raise ConfigError(f"{target} exists; kotune init does not overwrite it (move it, or name another DIR)")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(config_text(preset), encoding="utf-8")
    output.info(f"kotune: wrote {target} ({preset.title}, {preset.hub_id})")
    if preset.commercial_use is False:
        output.warn(f"{preset.title} is under the {preset.license_name}: no commercial use")
    output.info(f"kotune: next: set data.path to your data, then `kotune plan {target} --gpu NAME` and "
                f"`kotune train {target}`")  # fmt: skip
    return 0


def listing(items) -> list[str]:
    """One line per preset: name, hub id, architecture, licence and commercial use."""
    from kotune.presets import commercial_words

    rows = [(p.name, p.hub_id, p.architecture, p.license_name, commercial_words(p.commercial_use)) for p in items]
    head = ("preset", "hub id", "architecture", "licence", "commercial use")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in [head, *rows]]


def config_text(preset) -> str:
    """The config ``init`` writes: the preset's facts as a comment header, then its recipe with its comments."""
    from kotune.presets import commercial_words

    facts = [
        f"{preset.title} ({preset.hub_id}): kotune preset {preset.name}",
        f"architecture: {preset.architecture}",
        f"chat template: {preset.chat_template}",
        f"stop tokens: {' '.join(preset.stop_tokens)}",
        f"licence: {preset.license_name}; commercial use: {commercial_words(preset.commercial_use)}",
        f"fits (kotune plan --preset {preset.name}): "
        + ", ".join(f"{gpu} {'yes' if ok else 'no'}" for gpu, ok in preset.fits.items()),
        *(f"checked, {fact}: {where}" for fact, where in preset.checked.items()),
        "data: messages / sharegpt rows are rendered with the tokenizer's chat template (or data.chat_template), "
        "alpaca rows with data.template.",
        "Everything not written below is kotune's default (README, 'Configuration reference').",
    ]
    return "".join(f"# {line}\n" for line in facts) + preset.recipe_text
