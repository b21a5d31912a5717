"""nord-node flags: command line > NORD_* environment > --config file (JSON or TOML) > defaults."""

from __future__ import annotations

import json

import pytest

from node.__main__ import build_parser
from node.options import apply_sources
from node.worker_options import shard_for
from nord.errors import ConfigError

MADDR = "/ip4/127.0.0.1/tcp/4000/p2p/QmZqWdarUY7R8ntSuKJvTJGDmtzasj8YkP4Q39sZoZmXv8"


def parse(argv, environ=None):
    parser = build_parser()
    join = parser._subparsers._group_actions[0].choices["join"]
    apply_sources(join, argv, environ or {})
    return parser.parse_args(argv)


def test_config_file_fills_flags_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "node.json"
    cfg.write_text(json.dumps({"run": "r1", "initial-peers": [MADDR], "client_mode": True, "max_rounds": 5}))
    args = parse(["join", "--config", str(cfg), "--max-rounds", "2"])
    assert (args.run, args.initial_peers, args.client_mode, args.max_rounds) == ("r1", [MADDR], True, 2)


def test_toml_config_and_environment_precedence(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'run = "from-file"\ninitial_peers = ["{MADDR}"]\ndevice = "cpu"\n')
    env = {"NORD_RUN": "from-env", "NORD_CLIENT_MODE": "yes", "NORD_SHARD": "1/4"}
    args = parse(["join", "--config", str(cfg)], env)
    assert (args.run, args.device, args.client_mode, args.shard) == ("from-env", "cpu", True, "1/4")
    assert parse(["join", "--config", str(cfg), "--run", "cli"], env).run == "cli"


def test_environment_lists_split_on_spaces_and_commas():
    env = {"NORD_RUN": "r", "NORD_INITIAL_PEERS": f"{MADDR}, {MADDR}"}
    assert parse(["join"], env).initial_peers == [MADDR, MADDR]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"run": "r", "colour": 1}', "unknown option"),
        ('{"run": "r", "max_rounds": "many"}', "max_rounds"),
        ('{"run": "r", "device": "tpu"}', "not one of"),
        ("[1, 2]", "table/object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_config_files_are_named_in_one_line(tmp_path, content, message):
    cfg = tmp_path / "bad.json"
    cfg.write_text(content)
    with pytest.raises(ConfigError, match=message):
        parse(["join", "--config", str(cfg)])


def test_bad_environment_boolean_is_rejected():
    with pytest.raises(ConfigError, match="NORD_CLIENT_MODE: expected true/false"):
        parse(["join"], {"NORD_RUN": "r", "NORD_CLIENT_MODE": "maybe"})


def test_missing_config_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        parse(["join", "--config", str(tmp_path / "nope.json")])


def test_shard_is_stable_per_peer_and_overridable():
    assert shard_for("QmPeerA", None) == shard_for("QmPeerA", None)
    assert {shard_for(f"peer{i}", None)[0] for i in range(64)} == set(range(8))  # spread over all shards
    assert shard_for("x", "2/5") == (2, 5)
    for bad in ("5/5", "a/b", "3"):
        with pytest.raises(ConfigError, match="--shard"):
            shard_for("x", bad)


def test_cli_reports_bad_flags_as_one_line_and_exit_2(capsys, tmp_path):
    from node.__main__ import main

    assert (
        main(["join", "--run", "r", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--state-dir", str(tmp_path)])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nord-node: error:") and "/p2p/" in err[-1]
