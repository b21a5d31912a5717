"""`nord-coordinator`: write a run config (`init`) and run a training run's coordinator (`serve`).

    nord-coordinator init --run shakespeare-tiny --model tiny --out run.json
    nord-coordinator serve --run-config run.json --state-dir ~/.nord/coord --http 0.0.0.0:8000 \\
        --host-maddrs /ip4/0.0.0.0/tcp/31337 --announce-maddrs /ip4/<public ip>/tcp/31337
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from nord.cli import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nord-coordinator", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", help="write a run config", description="Write a run config (JSON).")
    init.add_argument("--run", required=True, help="run id: 1-64 of a-z 0-9 . _ -")
    init.add_argument("--model", default="tiny", help="model recipe: tiny, small, base, nord-1b")
    init.add_argument("--source", default="shakespeare", help="corpus source (see `nord data --help`)")
    init.add_argument("--vocab-size", type=int, help="tokenizer and model vocabulary (default: the recipe's)")
    init.add_argument("--quorum", type=int, default=3, help="seal once this many valid contributions arrived")
    init.add_argument(
        "--deadline", type=float, default=300.0, help="... or this many seconds after the round opened"
    )
    init.add_argument("--inner-steps", type=int, default=20, help="H: local steps per contribution")
    init.add_argument("--batch-size", type=int, default=8)
    init.add_argument("--seq-len", type=int, help="default: min(256, the model's max_seq_len)")
    init.add_argument(
        "--keep-checkpoints", type=int, default=5, help="sealed checkpoints kept by the coordinator"
    )
    target = init.add_mutually_exclusive_group()
    target.add_argument("--target-rounds", type=int, default=0, help="the run's goal in sealed rounds (ETA)")
    target.add_argument("--target-tokens", type=int, default=0, help="... or in accepted tokens (ETA)")
    init.add_argument(
        "--authority",
        action="append",
        default=[],
        metavar="HEX",
        help="authority public key (repeatable; default: the coordinator's own key at serve)",
    )
    init.add_argument("--data-dir", help="where prepared corpora go (the tokenizer's hash is pinned)")
    init.add_argument("--out", required=True, help="where to write run.json")
    init.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    init.set_defaults(func=_init)

    serve = sub.add_parser(
        "serve",
        help="run the coordinator: bootstrap peer, authority, checkpoints, dashboard",
        description="Run the coordinator: bootstrap peer, replica, authority, checkpoint server, dashboard.",
    )
    serve.add_argument("--run-config", required=True, metavar="FILE", help="run.json from `init`")
    serve.add_argument("--state-dir", required=True, help="keys, replica, history, checkpoints")
    serve.add_argument(
        "--host-maddrs",
        nargs="+",
        metavar="MULTIADDR",
        help="where the P2P peer listens (default: all interfaces, a free tcp port)",
    )
    serve.add_argument(
        "--announce-maddrs",
        nargs="+",
        metavar="MULTIADDR",
        help="public addresses to announce (with explicit ports)",
    )
    serve.add_argument("--http", default="127.0.0.1:8000", metavar="HOST:PORT", help="dashboard and API")
    serve.add_argument("--data-dir", help="where prepared corpora go (held-out batches for validation)")
    serve.add_argument("--allowlist", metavar="FILE", help="private run: hex peer keys allowed to contribute")
    serve.add_argument("--val-batches", type=int, default=2, help="held-out batches per validation")
    serve.add_argument(
        "--max-loss-increase",
        type=float,
        default=0.1,
        help="reject a contribution that raises held-out loss by more nats than this",
    )
    serve.add_argument(
        "--max-relative-norm",
        type=float,
        default=0.5,
        help="reject a contribution whose update norm exceeds this × the weights' norm",
    )
    serve.add_argument("--ban-after", type=int, default=3, help="ban a peer after this many rejections")
    serve.add_argument(
        "--local-only", action="store_true", help="loopback only: no UPnP/NAT-PMP/AutoNAT/relays (tests)"
    )
    serve.set_defaults(func=_serve, initial_peers=None, client_mode=False)
    return parser


def _init(args: argparse.Namespace) -> int:
    from node.session import genesis_weights
    from nord.checkpoint import weights_hash
    from nord.config import RoundConfig, RunConfig, TrainConfig
    from nord.data import DataConfig, prepare
    from nord.errors import ConfigError
    from nord.fsutil import atomic_write_bytes
    from nord.recipes import get_config

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it")
    model = get_config(args.model, vocab_size=args.vocab_size)
    seq_len = args.seq_len or min(TrainConfig().seq_len, model.max_seq_len)
    run = RunConfig(  # validated before the (slow) corpus preparation
        run_id=args.run,
        model=model,
        data=DataConfig(source=args.source, vocab_size=model.vocab_size),
        train=TrainConfig(inner_steps=args.inner_steps, batch_size=args.batch_size, seq_len=seq_len),
        rounds=RoundConfig(
            quorum=args.quorum,
            deadline_s=args.deadline,
            keep_checkpoints=args.keep_checkpoints,
            target_rounds=args.target_rounds,
            target_tokens=args.target_tokens,
        ),
        authorities=tuple(k.lower() for k in args.authority),
    )
    corpus = prepare(run.data, Path(args.data_dir).expanduser() if args.data_dir else None, progress=True)
    run = dataclasses.replace(
        run,
        data=dataclasses.replace(run.data, tokenizer_sha256=corpus.tokenizer_hash),
        genesis_hash=weights_hash(genesis_weights(run)),  # round 0's weights, vouched for by the signature
    )
    atomic_write_bytes(out, (run.to_json() + "\n").encode("utf-8"))
    print(
        f"wrote {out}: run {run.run_id}, model {args.model} (vocab {model.vocab_size}), "
        f"quorum {args.quorum}, deadline {args.deadline:g} s, H={args.inner_steps}, "
        f"genesis weights {run.genesis_hash[:16]}…"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from coordinator.server import serve

    return serve(args)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
