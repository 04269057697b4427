"""The `amphista` command. Each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import AmphistaError

# Modules exposing `add_parser(subparsers)`; each adds one or more subcommands whose `func(args)` runs them.
SUBCOMMANDS = [
    ".convert_llama2c",  # convert-llama2c
    ".training.cli",  # distill, train, heads-accuracy
    ".demo",  # demo
    ".bench.cli",  # bench, tree
    ".serve.cli",  # generate, serve
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="amphista",
        description="Lossless speculative decoding with Amphista drafters for Hugging Face causal LMs.",
    )
    parser.add_argument("--version", action="version", version=f"amphista {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        try:
            mod = importlib.import_module(module, __package__)
        except ModuleNotFoundError as e:
            if e.name and (__package__ + module).startswith(e.name):
                continue  # an optional subcommand whose module is absent from this install

            raise
        mod.add_parser(sub)
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
