"""The `amphista` command. Each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import AmphistaError

# name -> module exposing `add_parser(subparsers)`; the parser's `func(args)` runs the command.
SUBCOMMANDS = {}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="amphista",
        description="Lossless speculative decoding with Amphista drafters for Hugging Face causal LMs.",
    )
    parser.add_argument("--version", action="version", version=f"amphista {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        importlib.import_module(module, __package__).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except AmphistaError as e:
        print(f"amphista {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
