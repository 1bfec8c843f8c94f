"""The `pairfree` command line. Each command group lives in a module of this package exposing `add_parser`.

The library (`import pairfree`) never imports this package: it is the entry point and the home of the
experiment drivers (`demo`, `ablate`), as open_clip keeps `open_clip_train` apart from `open_clip`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module -> it defines add_parser(subparsers) registering one or more sub-commands with set_defaults(func=...)
COMMAND_MODULES = ("pairfree.cli.train", "pairfree.cli.encode", "pairfree.cli.demo", "pairfree.cli.ablate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pairfree", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that command module is not part of this build
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"pairfree {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
