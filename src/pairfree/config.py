"""Configs as data: dataclass defaults < YAML file < command-line flags, saved next to the run (timm style)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from pairfree.fileio import atomic_path


def _field_type(cls, f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One `--field-name` flag per dataclass field; unset flags keep the YAML / default value."""
    group = parser.add_argument_group(f"{cls.__name__} (override the defaults or --config)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        typ = _field_type(cls, f)
        if typ is bool:
            group.add_argument(flag, dest=f"cfg_{f.name}", action=argparse.BooleanOptionalAction, default=None)
        else:
            group.add_argument(flag, dest=f"cfg_{f.name}", type=typ, default=None, metavar=typ.__name__.upper(),
                               help=f"default {f.default!r}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def resolve_config(cls, args: argparse.Namespace, yaml_path: str | Path | None = None):
    """Build the config: defaults, then the YAML file's fields, then explicitly given flags."""
    values: dict[str, Any] = read_yaml(yaml_path) if yaml_path else {}
    for f in dataclasses.fields(cls):
        given = getattr(args, f"cfg_{f.name}", None)
        if given is not None:
            values[f.name] = given
    return cls.from_dict(values, str(yaml_path or "command line"))


def save_yaml(path: str | Path, config) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
