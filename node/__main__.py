"""`nord-node`: join a Nord training run as a worker, pull its latest checkpoint, or bootstrap a local run.

Flags can also come from NORD_* environment variables (NORD_INITIAL_PEERS, NORD_RUN, ...) and from
`--config FILE` (JSON or TOML with the long flag names); the command line wins, then the environment,
then the file.
"""

from __future__ import annotations

import argparse
import sys

from node.options import apply_sources
from nord.checks import MAX_NAME_CHARS, is_display_name
from nord.cli import run_command
from nord.protocol import ADOPT


def _common_peer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of flags (names as the long flags)")
    p.add_argument(
        "--initial-peers", nargs="+", metavar="MULTIADDR", help="the run's bootstrap peer(s): /ip4/…/p2p/<id>"
    )
    p.add_argument(
        "--host-maddrs",
        nargs="+",
        metavar="MULTIADDR",
        help="where to listen (default: all interfaces, a free tcp port)",
    )
    p.add_argument(
        "--announce-maddrs",
        nargs="+",
        metavar="MULTIADDR",
        help="public addresses to announce (with explicit ports)",
    )
    p.add_argument(
        "--local-only", action="store_true", help="loopback only: no UPnP/NAT-PMP/AutoNAT/relays (tests)"
    )


def display_name(value: str) -> str:
    """`--name`: what nord.checks.is_display_name accepts (surrounding spaces dropped)."""
    name = value.strip()
    if not is_display_name(name):
        raise argparse.ArgumentTypeError(
            f"--name {value[:40]!r}: use 1-{MAX_NAME_CHARS} printable characters (no control characters)"
        )
    return name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nord-node", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    join = sub.add_parser(
        "join", help="train with a run as a worker", description="Train with a run as a worker."
    )
    _common_peer_flags(join)
    join.add_argument("--run", required=True, help="the run id")
    join.add_argument(
        "--authority",
        metavar="HEX",
        help="the run's authority fingerprint (printed by the coordinator): a run config signed by any "
        "other key is refused; default: the one stored at this state dir's first join",
    )
    join.add_argument(
        "--state-dir", help="identity, replica log, residual, optimizer (default ~/.nord/<run>)"
    )
    join.add_argument("--data-dir", help="where prepared corpora go (default $NORD_DATA_DIR or ~/.nord/data)")
    join.add_argument(
        "--client-mode",
        action="store_true",
        help="this machine cannot accept inbound connections (Colab, NAT)",
    )
    join.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    join.add_argument(
        "--name",
        type=display_name,
        default=None,
        help=f"a display name shown beside your id on the coordinator's leaderboard (at most "
        f"{MAX_NAME_CHARS} printable characters; public)",
    )
    join.add_argument("--max-rounds", type=int, default=None, metavar="N", help="stop after N sealed rounds")
    join.add_argument("--shard", default=None, metavar="i/n", help="data shard (default: from the peer id)")
    join.add_argument(
        "--shards",
        default=None,
        metavar="LIST",
        help="parameter shards to train, e.g. 0,2 (default: the least-covered ones that fit this device)",
    )
    join.add_argument(
        "--poll-s", type=float, default=1.0, help="seconds between anti-entropy passes while waiting"
    )
    join.add_argument(
        "--adopt",
        choices=ADOPT,
        default="auto",
        help="how this worker follows the sealed rounds: 'auto' (default) sends its contribution to the "
        "coordinator only and, per sealed round, downloads whichever is fewer bytes: the round's change "
        "of the weights (its aggregate) or the contributions it lists, both checked against the "
        "authority's seal; 'aggregate' always the former; 'contributions' gathers every peer's "
        "contribution as it is published (downloads grow with the number of peers)",
    )
    join.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    join.add_argument(
        "--compact-every",
        type=int,
        default=8,
        metavar="N",
        help="fold sealed rounds into the local snapshot every N",
    )
    join.set_defaults(func=_join)

    pull = sub.add_parser(
        "pull", help="fetch the latest sealed checkpoint", description="Fetch the latest sealed checkpoint."
    )
    _common_peer_flags(pull)
    pull.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="URL|MULTIADDR",
        help="coordinator URL or a peer's multiaddr",
    )
    pull.add_argument("--out", required=True, metavar="FILE", help="where to write model.safetensors")
    pull.add_argument("--run", help="the run id (needed over P2P)")
    pull.add_argument(
        "--authority",
        metavar="HEX",
        help="the run's authority fingerprint: weights sealed by any other key are refused "
        "(without it or --state-dir, the server is trusted on first use and its fingerprint printed)",
    )
    pull.add_argument("--state-dir", help="a worker's state dir: check against the authority it pinned")
    pull.add_argument("--timeout-s", type=float, default=600.0)
    pull.set_defaults(func=_pull, client_mode=True)

    boot = sub.add_parser(
        "bootstrap",
        help="start a minimal bootstrap peer and authority for a local run",
        description="Start a minimal bootstrap peer and authority for a local run "
        "(nord-coordinator is the full one).",
    )
    _common_peer_flags(boot)
    boot.add_argument("--run", required=True, help="the run id to create or resume")
    boot.add_argument("--state-dir", help="default ~/.nord/<run>-bootstrap")
    boot.add_argument("--data-dir", help="where prepared corpora go")
    boot.add_argument("--recipe", default="tiny", help="model recipe: tiny, small, base, nord-1b")
    boot.add_argument("--data-source", default="shakespeare", help="corpus source (see `nord data --help`)")
    boot.add_argument("--inner-steps", type=int, default=20, help="H: local steps per contribution")
    boot.add_argument("--batch-size", type=int, default=8)
    boot.add_argument("--seq-len", type=int, default=64)
    boot.add_argument("--quorum", type=int, default=3, help="seal once this many contributions are pooled")
    boot.add_argument(
        "--deadline-s", type=float, default=300.0, help="... or this long after the round opened"
    )
    boot.set_defaults(func=_bootstrap, initial_peers=None)
    return parser


def _join(args: argparse.Namespace) -> int:
    from node.worker import join

    return join(args)


def _pull(args: argparse.Namespace) -> int:
    from node.pull import pull

    return pull(args)


def _bootstrap(args: argparse.Namespace) -> int:
    from node.bootstrap import bootstrap

    return bootstrap(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = next((a for a in argv if not a.startswith("-")), None)
    subparser = parser._subparsers._group_actions[0].choices.get(command) if command else None
    if subparser is not None:
        from nord.errors import NordError

        try:
            apply_sources(subparser, argv)
        except NordError as e:
            print(f"nord-node: error: {e}", file=sys.stderr)
            return 2
    return run_command(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
