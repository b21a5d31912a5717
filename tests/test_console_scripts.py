"""Every command of the three console scripts answers --help, and bad flags exit non-zero."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from nord.cli import build_parser


def walk(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*prefix, name))


def nord_commands():
    return list(walk(build_parser()))


@pytest.mark.parametrize("command", nord_commands(), ids=lambda c: "nord " + " ".join(c))
def test_every_nord_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*command, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["nord", "nord-node", "nord-coordinator"])
def test_console_scripts_answer_help(script):
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_unknown_command_exits_with_usage_error():
    out = subprocess.run(
        [sys.executable, "-m", "nord.cli", "no-such-command"], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "invalid choice" in out.stderr
