"""`nord-coordinator serve`: the bootstrap peer, full replica, authority, checkpoint server and dashboard.

One process: the hivemind peer (nord.transport, its own threads), the gossip protocol over the replica
(nord.gossip, same protocol as `nord-node join`), uvicorn serving the API and dashboard in a thread, and
the authority loop in the main thread. SIGINT/SIGTERM shut the peer down (no p2pd left), then uvicorn.

State directory (everything a restart needs; a restart resumes the run with nothing lost):

    p2p.key          libp2p key: the peer id in the multiaddrs volunteers were given
    p2p.port         the TCP port chosen at the first start (coordinator.address): the same on restart
    identity.key     ed25519 authority key that signs seals and removals
    run.json         the run config as served (with this authority's key added if it listed none)
    replica/         the CRDT replica: snapshot + append-only log
    history.sqlite   peers, rounds, contributions, metrics, seals, revocations, bans, checkpoints
    checkpoints/     the last `rounds.keep_checkpoints` sealed weights, <round>.safetensors
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path

from coordinator.address import reach_note, stable_host_maddrs
from coordinator.api import ApiContext, create_app, join_command
from coordinator.authority import Authority
from coordinator.history import History, HistoryReader
from coordinator.liveness import Liveness
from coordinator.validate import ValidationConfig, Validator
from node.bootstrap import serving_run
from node.session import authorize_run
from node.state import StateDir
from nord.checkpoint import read_metadata
from nord.checks import host_port
from nord.config import RunConfig
from nord.data import prepare
from nord.errors import CheckpointError, ConfigError
from nord.gossip import PEER_TTL_S, Gossip
from nord.identity import Identity
from nord.model import NordLM
from nord.recipes import RECIPES, get_config
from nord.transport import TransportConfig

log = logging.getLogger(__name__)

SYNC_EVERY_S = 5.0  # anti-entropy with one peer: picks up what client-mode peers left with others
HEARD_EVERY_S = 5.0  # requests heard from peers are written to the history this often
TICK_S = 0.2
HTTP_GRACE_S = 2.0  # on stop, open keep-alive connections (a dashboard tab) get this long, then are closed


def parse_http(value: str) -> tuple[str, int]:
    parsed = host_port(value)
    if parsed is None:
        raise ConfigError(f"--http {value!r}: write HOST:PORT, e.g. 0.0.0.0:8000")
    return parsed


def load_allowlist(path: str | None) -> frozenset[str] | None:
    """Hex ed25519 keys, one per line ('#' comments allowed); None without a file (public run)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"allowlist not found: {p}")
    keys = set()
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        key = line.split("#", 1)[0].strip().lower()
        if not key:
            continue
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ConfigError(f"{p}:{n}: {key[:70]!r} is not a 64-digit hex ed25519 public key")
        keys.add(key)
    return frozenset(keys)


def load_run(path: str, identity: Identity) -> RunConfig:
    """The run config, with this coordinator's key as the authority when the file lists none."""
    run = RunConfig.load(path)
    if not run.authorities:
        run = run.with_authorities((identity.public_hex,))
    elif identity.public_hex not in run.authorities:
        raise ConfigError(
            f"{path} lists authorities that do not include this coordinator's key {identity.public_hex}: "
            "add it, or start with the state dir that holds one of them"
        )
    return authorize_run(run, identity)  # genesis hash recorded, signed: what workers pin and verify


class UvicornThread:
    """uvicorn in a daemon thread (so signals stay with the main thread and the P2P peer)."""

    def __init__(self, app, host: str, port: int) -> None:
        import uvicorn

        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=HTTP_GRACE_S
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="nord-http", daemon=True)

    def start(self, timeout_s: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError("the HTTP server did not start: is the --http port already in use?")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(args) -> int:
    host, port = parse_http(args.http)  # every flag is checked before anything is written
    allowlist = load_allowlist(args.allowlist)
    RunConfig.load(args.run_config)
    validation = ValidationConfig(
        batches=args.val_batches,
        max_loss_increase=args.max_loss_increase,
        max_relative_norm=args.max_relative_norm,
        ban_after=args.ban_after,
    )
    state = StateDir(args.state_dir)
    identity = Identity.load_or_create(state.identity_key)
    listen = TransportConfig(host_maddrs=tuple(args.host_maddrs or ()), local_only=args.local_only)
    args.host_maddrs = stable_host_maddrs(listen.resolved_host_maddrs(), state.path)  # same port on restart
    run = load_run(args.run_config, identity)
    state.check_run(run.to_json())
    corpus = prepare(run.data, Path(args.data_dir).expanduser() if args.data_dir else None, progress=False)
    history = History.open(state.path / "history.sqlite")
    history.set_meta("run_id", run.run_id)
    reader = HistoryReader(history.path)  # the API's own connections: never the authority's lock
    try:
        with serving_run(args, run, state, corpus, role="coordinator") as (transport, replica, gossip):
            authority = Authority(
                run=run,
                replica=replica,
                identity=identity,
                history=history,
                validator=Validator(run, corpus, validation),
                checkpoint_dir=state.path / "checkpoints",
                validation=validation,
                lock=gossip.lock,
                publish_seal=gossip.publish_seal,
                publish_removal=gossip.publish_removal,
                allowlist=allowlist,
            )
            authority.start()
            liveness = Liveness(history)
            gossip.on_heard = liveness.heard
            multiaddrs = transport.visible_maddrs()
            app = create_app(
                ApiContext(
                    history=reader,
                    run_config=run.to_dict(),
                    checkpoint_dir=state.path / "checkpoints",
                    model=model_info(run),
                    admin=authority,
                    admin_token=os.environ.get("NORD_ADMIN_TOKEN") or None,
                    live=lambda: {"multiaddrs": multiaddrs, "authority": identity.public_hex},
                    seal_bytes=lambda rnd: seal_bytes(state.path / "checkpoints", rnd),
                    tokenizer_path=Path(corpus.path) / "tokenizer.json",
                )
            )
            http = UvicornThread(app, host, port)
            http.start()
            try:
                (state.path / "maddrs.txt").write_text("\n".join(multiaddrs) + "\n")
                shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
                print_ready(run, identity, multiaddrs, f"http://{shown_host}:{http.server.config.port}/")
                loop(authority, gossip, liveness)
            finally:
                http.stop()  # before the replica and transport it reads from go
        return 0
    finally:
        reader.close()
        history.close()


def print_ready(run: RunConfig, identity: Identity, multiaddrs: list[str], dashboard_url: str) -> None:
    print(f"run {run.run_id}: coordinator ready (authority fingerprint {identity.fingerprint})", flush=True)
    print("volunteers join with (--authority pins this coordinator's key: others are refused):", flush=True)
    print(f"  {join_command(multiaddrs, run.run_id, identity.public_hex)}", flush=True)
    for addr in multiaddrs[1:]:
        print(f"  (or --initial-peers {addr})", flush=True)
    if reach_note(multiaddrs):
        print(reach_note(multiaddrs), flush=True)
    print(f"dashboard: {dashboard_url}", flush=True)


def seal_bytes(checkpoint_dir: Path, rnd: int) -> bytes | None:
    """The seal whose weights are checkpoint `rnd` (round rnd - 1's), kept in the checkpoint's metadata."""
    try:
        seal = read_metadata(checkpoint_dir / f"{rnd}.safetensors").get("seal")
    except CheckpointError:
        return None
    return bytes.fromhex(seal) if seal else None


def loop(authority: Authority, gossip: Gossip, liveness: Liveness) -> None:
    """Until SIGINT/SIGTERM: authority steps, presence heartbeats, liveness, periodic anti-entropy."""
    last_heartbeat = last_sync = last_heard = 0.0
    while True:
        authority.step()
        now = time.monotonic()
        if now - last_heartbeat > PEER_TTL_S / 3:
            gossip.heartbeat()
            liveness.sync_presence(gossip.transport, authority.run.run_id)
            last_heartbeat = now
        if now - last_heard > HEARD_EVERY_S:
            liveness.flush()
            last_heard = now
        if now - last_sync > SYNC_EVERY_S:
            gossip.anti_entropy(fanout=1)
            last_sync = now
        time.sleep(TICK_S)


def model_info(run: RunConfig) -> dict:
    """What the dashboard shows about the model: the recipe it matches (else its shape) and its size."""
    import torch

    with torch.device("meta"):
        params = NordLM(run.model).num_params()
    cfg = dataclasses.asdict(run.model)
    recipes = [n for n in RECIPES if get_config(n, vocab_size=run.model.vocab_size) == run.model]
    return {
        "name": recipes[0] if recipes else f"d{cfg['d_model']}×{cfg['n_layers']}",
        "parameters": params,
        "layers": cfg["n_layers"],
        "d_model": cfg["d_model"],
        "vocab_size": cfg["vocab_size"],
    }
