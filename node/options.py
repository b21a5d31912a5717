"""Flags of `nord-node` from three places: the command line, then NORD_* environment variables, then a
`--config FILE` (JSON or TOML with the same names as the long flags, dashes or underscores).

Command line > environment > config file > built-in default. Environment names are NORD_ plus the flag
in upper case with underscores: `--initial-peers` is NORD_INITIAL_PEERS (several values separated by
spaces or commas), `--client-mode` is NORD_CLIENT_MODE=1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nord.errors import ConfigError

TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def apply_sources(
    parser: argparse.ArgumentParser, argv: list[str], environ: Mapping[str, str] = os.environ
) -> None:
    """Turn the config file's and the environment's values into `parser`'s defaults (CLI still wins)."""
    config_path = _config_path(argv) or environ.get("NORD_CONFIG")
    file_values = load_config_file(config_path) if config_path else {}
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config") and a.option_strings}
    unknown = sorted(set(file_values) - set(actions))
    if unknown:
        raise ConfigError(f"{config_path}: unknown option(s) {', '.join(unknown)}; see --help")
    defaults: dict[str, Any] = {}
    for dest, action in actions.items():
        env_name = "NORD_" + dest.upper()
        if env_name in environ:
            defaults[dest] = _convert(action, environ[env_name], env_name)
        elif dest in file_values:
            defaults[dest] = _convert(action, file_values[dest], f"{config_path}: {dest}")
    parser.set_defaults(**defaults)
    for dest in defaults:
        actions[dest].required = False


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        raw = _toml_module(p).loads(text) if p.suffix.lower() == ".toml" else json.loads(text)
    except ValueError as e:
        kind = "TOML" if p.suffix.lower() == ".toml" else "JSON"
        raise ConfigError(f"config file {p} is not valid {kind}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a table/object of flag names")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def _toml_module(p: Path):
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:  # Python 3.10
        import tomli
    except ImportError:
        raise ConfigError(
            f"{p}: TOML config files need Python 3.11+ or `pip install tomli`; or use JSON"
        ) from None
    return tomli


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """A config/env value as argparse would have produced it from the command line."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in TRUE | FALSE:
            return text in TRUE
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    many = action.nargs in ("+", "*")
    items = (
        value if isinstance(value, list) else (re.split(r"[\s,]+", str(value).strip()) if many else [value])
    )
    items = [i for i in items if i != ""]
    convert = action.type or str
    try:
        converted = [convert(i) if isinstance(i, str) else i for i in items]
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{where}: {e}") from None
    if action.choices is not None:
        bad = [c for c in converted if c not in action.choices]
        if bad:
            raise ConfigError(f"{where}: {bad[0]!r} is not one of {', '.join(map(str, action.choices))}")
    return converted if many else (converted[0] if converted else None)
