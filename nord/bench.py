"""`nord bench NAME [ARGS...]`: run one of the benchmark scripts under bench/ of a source checkout.

Benchmarks are plain scripts (they print a table and write JSON), kept out of the installed package;
this command finds them next to the package and runs them with the remaining arguments.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from nord.errors import ConfigError

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


def available() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="run a benchmark script from bench/ (e.g. `nord bench codec --help`)",
        description="Run a benchmark from bench/. Names: " + (", ".join(available()) or "(none found)"),
    )
    p.add_argument("name", help="benchmark name (a file bench/NAME.py)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    script = BENCH_DIR / f"{args.name}.py"
    if not script.is_file():
        names = ", ".join(available()) or "none (bench/ is only in a source checkout)"
        raise ConfigError(f"unknown benchmark {args.name!r}; available: {names}")
    argv = sys.argv
    sys.argv = [str(script), *args.args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv = argv
    return 0
