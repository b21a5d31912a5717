"""`nord`: the library's command line — prepare data, train, generate, evaluate, benchmark, demo.

Each subcommand lives in the module that owns the work and exposes `register(subparsers)`, which adds
its parser and sets `func(args) -> int`. Errors Nord raises on purpose become one line on stderr and
exit code 2; nothing else is caught, so real bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from nord.errors import NordError

# subcommand -> module that registers it
COMMANDS = {
    "data": "nord.data.cli",
    "train": "nord.train",
    "generate": "nord.generate",
    "eval": "nord.evaluate",
    "bench": "nord.bench",
    "demo": "nord.demo",
    "simulate": "nord.sim.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nord", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).register(sub)
    return parser


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse `argv`, run the chosen command, and turn `NordError`s into one line and exit code 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except NordError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
