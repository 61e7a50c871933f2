"""Reading a config: a YAML file and ``key=value`` overrides into a ``Config``, each value checked against its
field's type, unknown keys named with the closest valid one. The sections and their checks are ``config``'s.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from kotune.config import SECTIONS, Config, ConfigError, all_keys, validate


def _unknown_key(key: str, where: str) -> ConfigError:
    """An error naming the unknown key and the closest valid one (by full key, else by its last part)."""
    keys = all_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:
        leaves = difflib.get_close_matches(key.split(".")[-1], [k.split(".")[1] for k in keys], n=1, cutoff=0.6)
        same_leaf = [k for k in keys if leaves and k.split(".")[1] == leaves[0]]
        close = difflib.get_close_matches(key, same_leaf, n=1, cutoff=0.0)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Check and convert a YAML or command-line value to the field's type."""
    args = get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where}: '{key}' cannot be null")
    if get_origin(hint) in (Union, UnionType):  # X | None becomes X; X | Y is tried in order
        args = tuple(a for a in args if a is not type(None))
        hint = args[0] if len(args) == 1 else args
    if isinstance(hint, tuple):  # a union such as list[str] | str: the first type that fits
        for option in hint:
            try:
                return _coerce(value, option, key, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: '{key}' has value {value!r} of the wrong type")
    origin = get_origin(hint)
    if origin is Literal:  # checked against its values by validate, which names them
        return _to_str(value, key, where)
    if origin is list:
        return _coerce_list(value, get_args(hint)[0], key, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return {str(k): _coerce(v, get_args(hint)[1], f"{key}.{k}", where) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _to_dataclass(value, hint, key, where)
    return SCALARS[hint](value, key, where)


def _to_dataclass(value: Any, cls: type, key: str, where: str) -> Any:
    """A mapping (e.g. one of ``data.sources``) as ``cls``, each value checked; unknown keys named."""
    if isinstance(value, str):  # a bare path on the command line or in a list: the one required field
        value = {"path": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' items must be mappings, got {value!r}")
    hints = get_type_hints(cls)
    for name in value:
        if name not in hints:
            close = difflib.get_close_matches(str(name), list(hints), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; keys: {', '.join(hints)}"
            raise ConfigError(f"{where}: unknown key '{name}' in '{key}'{hint}")
    return cls(**{str(k): _coerce(v, hints[str(k)], f"{key}.{k}", where) for k, v in value.items()})


def _coerce_list(value: Any, item: Any, key: str, where: str) -> list:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
    return [_coerce(v, item, key, where) for v in value]


def _to_bool(value: Any, key: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")


def _to_number(kind: type):
    def convert(value: Any, key: str, where: str):
        if isinstance(value, bool) or isinstance(value, dict | list):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}") from None
        if kind is int:
            if number != int(number):
                raise ConfigError(f"{where}: '{key}' must be a whole number, got {value!r}")
            return int(number)
        return number

    return convert


def _to_str(value: Any, key: str, where: str) -> str:
    if isinstance(value, dict | list):
        raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
    if isinstance(value, bool):  # YAML reads a bare on / off / yes / no as a boolean
        return "on" if value else "off"
    return str(value)


SCALARS = {bool: _to_bool, int: _to_number(int), float: _to_number(float), str: _to_str}


def _apply(cfg: Config, key: str, value: Any, where: str) -> None:
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        raise _unknown_key(key, where)
    target = getattr(cfg, section)
    hints = get_type_hints(type(target))
    if name not in hints:
        raise _unknown_key(key, where)
    setattr(target, name, _coerce(value, hints[name], key, where))


def _parse_cli_value(text: str) -> Any:
    """A command-line value is read as YAML, so ``1e-4``, ``true``, ``[a, b]`` and ``null`` work."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if value is None and text.strip() not in ("null", "~"):
        return text
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (sections ``model``, ``data``, ``lora``, ``train``) and apply ``key=value`` overrides."""
    if path is None:
        return config_from_text("", "command line", overrides)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    return config_from_text(path.read_text(encoding="utf-8"), str(path), overrides)


def config_from_text(text: str, where: str, overrides: list[str] | None = None) -> Config:
    """A config's YAML ``text`` (``where`` names it in errors) with ``key=value`` overrides applied, checked."""
    cfg = Config()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections")
    for section, values in raw.items():
        if section not in SECTIONS:
            raise _unknown_key(str(section), where)
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section '{section}' must be a mapping")
        for name, value in values.items():
            _apply(cfg, f"{section}.{name}", value, where)
    for item in overrides or []:
        key, sep, text_value = item.partition("=")
        if not sep:
            raise ConfigError(f"command line: override '{item}' must look like section.key=value")
        _apply(cfg, key.strip(), _parse_cli_value(text_value), "command line")
    validate(cfg)
    return cfg
