"""Configs as data: dataclass defaults < YAML file < command-line flags, saved next to the run (timm style).

Every field is checked and coerced by its declared type and its rules (`option(default, gt=0, ...)`):
YAML reads `lr: 1e-3` as the string "1e-3" and it becomes 0.001; `epochs: "ten"`, `epochs: 1.5`,
`semantic_consistency: "maybe"`, `noise_variance: -1` or `temperature: .inf` are refused with a
message naming the file, the field, the value and what was expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pairfree.fileio import atomic_path

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


class ConfigError(ValueError):
    """A config value of the wrong type or out of range; the message names the field and the value."""


def option(default: Any, *, gt: float | None = None, ge: float | None = None, le: float | None = None,
           choices: tuple | None = None, doc: str = "") -> Any:
    """A dataclass field with validation rules (see `check_fields`)."""
    rules = {k: v for k, v in (("gt", gt), ("ge", ge), ("le", le), ("choices", choices)) if v is not None}
    return dataclasses.field(default=default, metadata={"rules": rules, "doc": doc})


def field_type(cls, f: dataclasses.Field) -> tuple[type, bool]:
    """(declared type, whether None is allowed) of a dataclass field."""
    hint = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _describe(typ: type, rules: dict, optional: bool) -> str:
    if "choices" in rules:
        text = f"one of {list(rules['choices'])}"
    else:
        text = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(typ, typ.__name__)
        bounds = [f"{op} {rules[k]:g}" for k, op in (("gt", ">"), ("ge", ">="), ("le", "<=")) if k in rules]
        text += (" " + " and ".join(bounds)) if bounds else ""
    return text + (" (or null)" if optional else "")


def coerce(value: Any, typ: type, rules: dict, optional: bool, where: str) -> Any:
    """`value` as `typ` when it unambiguously is one (YAML strings of numbers, integral floats for
    integers, true/false spellings for booleans), checked against `rules`; ConfigError otherwise."""
    bad = ConfigError(f"{where}: expected {_describe(typ, rules, optional)}, got {value!r}")
    if value is None:
        if optional:
            return None
        raise bad
    if typ is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            out = value.strip().lower() in _TRUE
        else:
            raise bad
    elif typ is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                raise bad from None
        if isinstance(value, float):
            if not value.is_integer():
                raise bad
            value = int(value)
        if not isinstance(value, int):
            raise bad
        out = value
    elif typ is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        out = float(value)
    elif typ is str:
        if not isinstance(value, str):
            raise bad
        out = value
    else:  # pragma: no cover - configs use the four types above
        raise TypeError(f"{where}: unsupported config type {typ!r}")
    if "choices" in rules and out not in rules["choices"]:
        raise bad
    if ("gt" in rules and not out > rules["gt"]) or ("ge" in rules and not out >= rules["ge"]) or (
            "le" in rules and not out <= rules["le"]):
        raise bad
    return out


def check_fields(obj) -> None:
    """Coerce and validate every field of a config dataclass in place (call from `__post_init__`)."""
    cls = type(obj)
    for f in dataclasses.fields(obj):
        typ, optional = field_type(cls, f)
        value = coerce(getattr(obj, f.name), typ, f.metadata.get("rules", {}), optional, f"{cls.__name__}.{f.name}")
        object.__setattr__(obj, f.name, value)


def from_dict(cls, d: Any, source: str = "config"):
    """Build a config from a mapping (a YAML file, a saved config.json); errors name `source`."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of {cls.__name__} fields, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, d)) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    try:
        return cls(**d)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One `--field-name` flag per dataclass field; unset flags keep the YAML / default value."""
    group = parser.add_argument_group(f"{cls.__name__} (override the defaults or --config)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        typ, optional = field_type(cls, f)
        rules = f.metadata.get("rules", {})
        doc = f.metadata.get("doc", "")
        # argparse %-formats help strings: a "%" in prose ("14 % more") would break --help
        help_text = ((doc + "; " if doc else "") + f"default {f.default!r}").replace("%", "%%")
        if typ is bool:
            group.add_argument(flag, dest=f"cfg_{f.name}", action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif "choices" in rules:
            group.add_argument(flag, dest=f"cfg_{f.name}", choices=rules["choices"], default=None, help=help_text)
        else:
            allowed = _describe(typ, rules, optional)
            group.add_argument(flag, dest=f"cfg_{f.name}", type=str, default=None, metavar=typ.__name__.upper(),
                               help=f"{help_text}; {allowed}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder, expected a YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def resolve_config(cls, args: argparse.Namespace, yaml_path: str | Path | None = None):
    """Build the config: defaults, then the YAML file's fields, then explicitly given flags.

    Flags arrive as strings and are coerced like YAML values, so `--temperature inf` or
    `--epochs 1.5` are refused the same way (naming the flag)."""
    values: dict[str, Any] = read_yaml(yaml_path) if yaml_path else {}
    config = from_dict(cls, values, str(yaml_path or "defaults"))
    flags = {}
    for f in dataclasses.fields(cls):
        given = getattr(args, f"cfg_{f.name}", None)
        if given is not None:
            typ, optional = field_type(cls, f)
            where = f"command line --{f.name.replace('_', '-')}"
            flags[f.name] = coerce(given, typ, f.metadata.get("rules", {}), optional, where)
    return from_dict(cls, {**dataclasses.asdict(config), **flags}, "command line") if flags else config


def save_yaml(path: str | Path, config, header: str = "") -> None:
    """The resolved config as YAML (loadable again with --config); `header` lines become comments."""
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    with atomic_path(path) as tmp:
        tmp.write_text(comments + yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
