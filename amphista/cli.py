"""The `amphista` command. Each subcommand lives in its own module and registers itself here.

Also the argument types and the help formatter the subcommands share, so that a bad value fails when the
command line is parsed (argparse's one-line error, exit status 2) instead of after minutes of loading.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
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

# Shell conventions: 128 + SIGINT, 128 + SIGPIPE.
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is nothing to show (None, False, a flag) or the
    help text already explains it in words ("default: the bundled model")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower():
            return text
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        if action.nargs == 0:  # store_true and the like: the flag's absence says it
            return text
        return super()._get_help_string(action)


def int_range(low: int | None = None, high: int | None = None, what: str = "an integer"):
    """An argparse `type` accepting integers in [low, high] (either end open when None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            if high is None:
                bound = f"at least {low}"
            elif low is None:
                bound = f"at most {high}"
            else:
                bound = f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in its own messages
    return parse


def add_drafter_dtype(p: argparse.ArgumentParser) -> None:
    """`--drafter-dtype`, the same for every command that drafts (see amphista.drafters.precision)."""
    p.add_argument(
        "--drafter-dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="dtype drafters draft in (default auto: the target's, or on a float32 CPU target bfloat16 where it "
        "drafts measurably faster here; measured once, then cached). The output never depends on it",
    )


# --dtype's choices: the keys of target.DTYPE_NAMES, spelled out here so that parsing needs no torch.
TARGET_DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def add_placement(p: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype` for the target, the same for every command that loads one."""
    p.add_argument(
        "--device",
        default=None,
        help="where the target runs: cpu, cuda, cuda:1, mps, ... (default: cpu); drafters follow it",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=TARGET_DTYPES,
        help="the target's weights: auto keeps the saved dtype (float32 for the bundled model and the "
        "converted GGUF targets); bfloat16 or float16 on a GPU",
    )


# --tree-shape -> SpeculativeDecoder's `dynamic` (None: dynamic trees with --tree auto, static otherwise).
TREE_SHAPES = {"default": None, "static": False, "dynamic": True}


def add_tree_shape(p: argparse.ArgumentParser, both: bool = False) -> None:
    """`--tree-shape`, the same for every command that drafts; `both` (bench): every method in each shape."""
    p.add_argument(
        "--tree-shape",
        choices=(*TREE_SHAPES, "both") if both else tuple(TREE_SHAPES),
        default="default",
        help="static: verify the same tree every step; dynamic: shape each step's tree (as many nodes) from "
        "the drafter's probabilities at that step and its measured path frequencies; "
        + ("both: every speculative method in each shape, side by side (NAME:static, NAME:dynamic); " if both else "")
        + "default: dynamic with --tree auto, static with a given tree"
        + (" or --tree-sweep" if both else ""),
    )


def float_range(low: float, high: float | None = None, low_open: bool = False):
    """An argparse `type` accepting finite floats >= low (> low when low_open) and <= high."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            left = "(" if low_open else "["
            bound = f"in {left}{low}, {high}]" if high is not None else f"{'>' if low_open else '>='} {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


positive_int = int_range(1, what="a positive integer")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="amphista",
        description="Lossless speculative decoding with Amphista drafters for Hugging Face causal LMs.",
        formatter_class=HelpFormatter,
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
    # A subcommand that did not choose a formatter still shows its defaults in --help.
    for command in sub.choices.values():
        if command.formatter_class is argparse.HelpFormatter:
            command.formatter_class = HelpFormatter
    return parser


def _end_terminal_line() -> None:
    """After Ctrl-C the terminal shows "^C" mid-line: start the shell prompt on a fresh line. Files and
    pipes get nothing, so what they hold stays exactly what the command wrote."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
            if stream.isatty():
                stream.write("\n")
                stream.flush()
                return
        except (OSError, ValueError, AttributeError):
            continue


def _silence_stdout() -> None:
    """The reader of stdout is gone: send what is still buffered to /dev/null, so that the interpreter's
    final flush does not print "Exception ignored ... BrokenPipeError" on the way out."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is both of the first two
        pass


def main(argv: list[str] | None = None) -> int:
    # PyTorch's CPU allocator maps tensors of 2 MB and more with transparent huge pages when asked (read at
    # its first allocation, so before torch is imported): each vocabulary-sized tensor of a training step is
    # a fresh mapping paged in again. SmolLM2's Amphista drafter, 2 threads: 607 -> 644 tokens/s on chat
    # data, 9.3 -> 6.5 s a step of 8 full 512-token rows. THP_MEM_ALLOC_ENABLE=0 keeps the small pages.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    command = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command = args.command
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that left shows up here, not as a warning at interpreter exit
        return code
    except AmphistaError as e:
        _flush_quietly()
        print(f"amphista {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, at start-up as much as while generating
        _end_terminal_line()
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `amphista generate ... | head -c 20`
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _flush_quietly() -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
