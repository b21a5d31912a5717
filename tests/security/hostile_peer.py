"""A hostile peer built from Nord's own library: it joins a real run and lies about state.

    python tests/security/hostile_peer.py --initial-peers MADDR --run RUN --mode MODE --state-dir DIR

It announces itself in the run's DHT presence records like any worker, and to every `sync` it answers
that the caller is behind its compaction point (`behind=True`), to every `hello` that it is at round
10^6, and to `snapshot` with the state of its `--mode`:

    unsealed         a round-0 snapshot of other weights, no seal (not the run's genesis weights)
    forged-seal      a round-3 snapshot of other weights sealed by its own key (not the run's authority)
    stolen-seal      the run's real latest snapshot and seal, with other weights
    tampered-window  the run's real latest snapshot and seal, with a made-up folded contribution added to
                     the metadata the seal must cover
    stale            the run's real round-0 snapshot (its genesis weights): valid, but older than the
                     caller's state (a `behind` liar that serves only data the authority vouches for)
    impostor         a run config with the same run id signed by its own key (and its own genesis)

It writes what it was asked (`served.json`: requests per handler) and its multiaddr (`maddrs.txt`) to
--state-dir, and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import torch

from node.session import model_spec, start_transport
from nord.checkpoint import load_checkpoint, save_checkpoint, weights_hash
from nord.config import RunConfig
from nord.crdt import Delta, Replica
from nord.fsutil import atomic_write_bytes
from nord.gossip import fetch_run_config_json, fetch_snapshot, snapshot_max_bytes
from nord.identity import Identity
from nord.model import NordLM

MODES = ("unsealed", "forged-seal", "stolen-seal", "tampered-window", "stale", "impostor")
CLAIMED_ROUND = 10**6
FAKE_ID = "f" * 64


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def other_weights(run: RunConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(666)
    return {name: torch.randn(*shape, generator=g) for name, shape in model_spec(run).items()}


def genesis(run: RunConfig) -> dict[str, torch.Tensor]:
    """The run's real round-0 weights (the model from `train.seed`, as every peer builds it)."""
    torch.manual_seed(run.train.seed)
    return {name: p.detach() for name, p in NordLM(run.model).named_parameters()}


def forged_snapshot(run: RunConfig, mode: str, real: Path, tmp: Path, me: Identity) -> bytes:
    """The snapshot this mode serves (see the module docstring)."""
    out = tmp / f"{mode}.safetensors"
    if mode in ("unsealed", "stale"):
        weights = other_weights(run) if mode == "unsealed" else genesis(run)
        replica = Replica(run_id=run.run_id, spec=model_spec(run), base=weights, merge=run.merge,
                          authorities=[bytes.fromhex(k) for k in run.authorities])  # fmt: skip
        replica.save_snapshot(out)
    elif mode == "forged-seal":
        replica = Replica(run_id=run.run_id, spec=model_spec(run), base=other_weights(run), merge=run.merge,
                          authorities=[me.public_key])  # fmt: skip
        for _ in range(3):
            replica.seal(me)
        replica.compact()
        replica.save_snapshot(out)
    elif mode in ("stolen-seal", "tampered-window"):
        tensors, meta = load_checkpoint(real)
        meta = {k: v for k, v in meta.items() if k not in ("format_version", "weights_hash")}
        if mode == "stolen-seal":
            tensors = {name: t + 0.5 for name, t in tensors.items()}
        else:
            folded = json.loads(meta["folded"])
            folded[FAKE_ID] = int(meta["base_round"]) - 1
            meta["folded"] = json.dumps(folded, sort_keys=True)
        save_checkpoint(out, tensors, meta)
    else:
        return b""
    return out.read_bytes()


def impostor_config(run: RunConfig, me: Identity) -> str:
    fake = dataclasses.replace(run.with_authorities((me.public_hex,)),
                               genesis_hash=weights_hash(other_weights(run)))  # fmt: skip
    return fake.signed(me).to_json()


class Hostile:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.state = args, Path(args.state_dir)
        self.state.mkdir(parents=True, exist_ok=True)
        self.transport = start_transport(args, self.state / "p2p.key")
        self.me = Identity.load_or_create(self.state / "identity.key")
        self.served: dict[str, int] = {}
        self.lock = threading.Lock()
        source = args.initial_peers[0].rsplit("/p2p/", 1)[1]
        self.run_json = fetch_run_config_json(self.transport, source, args.run)
        run = RunConfig.from_json(self.run_json)
        with tempfile.TemporaryDirectory() as tmp:
            real = fetch_snapshot(
                self.transport,
                source,
                args.run,
                Path(tmp) / "real.safetensors",
                max_bytes=snapshot_max_bytes(run.model),
            )
            self.snapshot = forged_snapshot(run, args.mode, real, Path(tmp), self.me)
        if args.mode == "impostor":
            self.run_json = impostor_config(run, self.me)

    def count(self, name: str) -> None:
        with self.lock:
            self.served[name] = self.served.get(name, 0) + 1
            atomic_write_bytes(self.state / "served.json", json.dumps(self.served).encode())

    def handler(self, name: str, reply):
        def handle(peer: str, body: bytes) -> bytes:
            self.count(name)
            return reply()

        return handle

    def serve(self) -> None:
        run_id = self.args.run
        handlers = {
            "hello": lambda: pack(
                {
                    "run_id": run_id,
                    "role": "worker",
                    "client_mode": False,
                    "round": CLAIMED_ROUND,
                    "base_hash": "0" * 64,
                }
            ),  # fmt: skip
            "config": lambda: self.run_json.encode(),
            "sync": lambda: pack({"delta": Delta().to_bytes(), "digest": {}, "behind": True, "more": False}),
            "push": lambda: pack({"accepted": 0}),
            "fetch": lambda: pack({"delta": Delta().to_bytes()}),
            "snapshot": lambda: self.snapshot,
        }
        for name, reply in handlers.items():
            self.transport.add_handler(name, self.handler(name, reply), max_request_bytes=1 << 20)
        atomic_write_bytes(self.state / "maddrs.txt", "\n".join(self.transport.visible_maddrs()).encode())
        while True:
            record = {"role": "worker", "client_mode": False, "key": self.me.public_hex}
            self.transport.store_record(f"nord/{run_id}/peers", self.transport.peer_id, record, 60.0)
            time.sleep(5.0)


def loopback_peer_args(doc: str, argv: list[str] | None, **extra: dict) -> argparse.Namespace:
    """A hostile peer's flags (--initial-peers, --run, --state-dir, and `extra`: flag name -> argparse
    keywords), with the transport settings of a peer that listens on 127.0.0.1 only."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--state-dir", required=True)
    for name, keywords in extra.items():
        parser.add_argument(f"--{name}", **keywords)
    args = parser.parse_args(argv)
    args.host_maddrs, args.announce_maddrs, args.local_only = ["/ip4/127.0.0.1/tcp/0"], [], True
    return args


def main(argv: list[str] | None = None) -> int:
    args = loopback_peer_args(__doc__, argv, mode={"choices": MODES, "required": True})
    hostile = Hostile(args)
    hostile.transport.install_signal_handlers()
    try:
        hostile.serve()
    except KeyboardInterrupt:
        return 0
    finally:
        hostile.transport.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
