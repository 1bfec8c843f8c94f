"""The `pairfree` command line. Each command group lives in a module of this package exposing `add_parser`.

The library (`import pairfree`) never imports this package: it is the entry point and the home of the
experiment drivers (`demo`, `ablate`, `study`, `tune`), as open_clip keeps `open_clip_train` apart from `open_clip`.

Errors print one line naming the file, field and expectation and exit with status 2; `--debug`
(anywhere on the command line, or PAIRFREE_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

# module -> it defines add_parser(subparsers) registering one or more sub-commands with set_defaults(func=...)
COMMAND_MODULES = ("pairfree.cli.train", "pairfree.cli.encode", "pairfree.cli.search", "pairfree.cli.eval",
                   "pairfree.cli.demo", "pairfree.cli.ablate", "pairfree.cli.study", "pairfree.cli.tune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pairfree", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also accepted after the command)")
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


def quiet_libraries() -> None:
    """--quiet: no warnings from torch / torchvision / transformers, no info logs from pairfree."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.simplefilter("ignore")
    logging.getLogger("pairfree").setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PAIRFREE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"pairfree {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for the user; --debug for the traceback
        if debug:
            raise
        print(f"pairfree {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    known = (ValueError, OSError, ImportError)
    if not isinstance(e, known):
        text = f"{type(e).__name__}: {text} (run with --debug for the traceback)"
    return text


if __name__ == "__main__":
    sys.exit(main())
